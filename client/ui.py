"""What the user reads: French or English, progress on a terminal, JSON for scripts.

The language comes from ``PLI_LANG`` (``fr`` or ``en``), else from ``LANG``; a
practitioner's machine set to French gets French.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from protocol.errors import PliError

__all__ = ["Progress", "clean", "emit", "error_text", "lang", "tr"]


def lang() -> str:
    chosen = os.environ.get("PLI_LANG") or os.environ.get("LANG", "")
    return "fr" if chosen.lower().startswith("fr") else "en"


def tr(fr: str, en: str) -> str:
    return fr if lang() == "fr" else en


# Stable error codes → what a doctor should do about them.
_ADVICE: dict[str, tuple[str, str]] = {
    "invalid_invitation": (
        "Code d'invitation inconnu, déjà utilisé ou expiré : demandez-en un nouveau à l'administrateur du relais.",
        "Invitation code unknown, already used or expired: ask the relay's administrator for a new one.",
    ),
    "device_exists": ("Cet appareil est déjà inscrit.", "This device is already enrolled."),
    "relay_unreachable": (
        ("Le relais ne répond pas. Vérifiez la connexion. Un envoi interrompu est conservé et part au prochain "
         "`pli cases` ; une réception interrompue reprend où elle s'est arrêtée."),
        ("The relay does not answer. Check the connection. An interrupted send is kept and goes at the next "
         "`pli cases`; an interrupted download resumes where it stopped."),
    ),
    "key_changed": (
        "ATTENTION : les clés de ce correspondant ont changé.",
        "WARNING: this correspondent's keys have changed.",
    ),
    "decryption_failed": (
        "Impossible de déchiffrer : mauvaise phrase de passe, ou fichier modifié.",
        "Cannot decrypt: wrong passphrase, or the file was altered.",
    ),
    "not_a_recipient": (
        "Ce pli ne vous est pas adressé : il a pu être détourné. Ne l'utilisez pas.",
        "This envelope is not addressed to you: it may have been diverted. Do not use it.",
    ),
    "bad_bundle": (
        "Le contenu de ce pli ne correspond pas à ce que l'expéditeur a signé. Ne l'utilisez pas.",
        "This envelope's content does not match what the sender signed. Do not use it.",
    ),
    "bad_signature": (
        "Signature invalide : ce pli n'est pas authentique. Ne l'utilisez pas.",
        "Invalid signature: this envelope is not authentic. Do not use it.",
    ),
    "unauthorized": (
        "Le relais ne reconnaît pas cet appareil (révoqué, ou horloge déréglée).",
        "The relay does not recognise this device (revoked, or the clock is wrong).",
    ),
    "stale_signature": (
        "L'horloge de cet ordinateur est décalée de plus de 5 minutes : corrigez l'heure.",
        "This computer's clock is off by more than 5 minutes: set the time right.",
    ),
    "invalid_identifier": ("Identifiant invalide.", "Invalid identifier."),
    "rate_limited": ("Le relais demande de ralentir : réessayez dans une minute.",
                     "The relay asks to slow down: try again in a minute."),
    "quota_exceeded": (
        ("Votre espace sur le relais est plein de plis pas encore retirés par leurs destinataires : "
         "attendez qu'ils les ouvrent, ou voyez l'administrateur du relais."),
        ("Your space on the relay is full of envelopes their recipients have not fetched yet: wait for them "
         "to open them, or ask the relay's administrator."),
    ),
    "storage_unavailable": (
        "Le relais ne peut pas enregistrer pour l'instant (disque plein) : rien n'a été enregistré, réessayez plus tard.",
        "The relay cannot store right now (disk full): nothing was recorded, try again later.",
    ),
    "unavailable": ("Le relais est surchargé : réessayez dans un instant.",
                    "The relay is busy: try again in a moment."),
    "log_alarm": (
        "ALERTE : le journal du relais contredit ce que cet ordinateur a déjà vu ; il a pu réécrire l'historique.",
        "ALERT: the relay's log contradicts what this computer saw before; it may have rewritten history.",
    ),
}


def error_text(e: PliError) -> str:
    advice = _ADVICE.get(e.code)
    head = tr(*advice) if advice else ""
    detail = str(getattr(e, "message_fr", "") or e.message) if lang() == "fr" else e.message
    return f"{head}\n  {detail}" if head and detail and detail != head else (head or detail)


_CONTROL = {c: None for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x0A, 0x09)}


def clean(text: object) -> str:
    """Text from a colleague's signed envelope, safe to print: no terminal control codes."""
    return str(text).translate(_CONTROL)


def emit(as_json: bool, data: dict[str, Any] | list[Any], text: str) -> None:
    """One result: JSON on stdout for scripts, or text for people."""
    if as_json:
        print(json.dumps(data, ensure_ascii=False, indent=None))
    elif text:
        print(text)


class Progress:
    """A one-line progress bar on stderr, only on a terminal and never with --json."""

    def __init__(self, label: str, *, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0
        self._started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        pct = 100 * done // total if total else 100
        rate = done / max(now - self._started, 1e-6) / 1e6
        bar = "#" * (pct // 4)
        sys.stderr.write(f"\r{self.label} [{bar:<25}] {pct:3d}% {done / 1e6:,.1f} MB {rate:,.0f} MB/s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
