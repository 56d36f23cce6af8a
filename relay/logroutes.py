"""The log's public, unauthenticated read endpoints (SPEC.md §11.5).

Anyone — an auditor, a witness, a monitor — may read the log: it holds hashes, ids
and times, never content. Every answer is bounded (at most ``MAX_ENTRIES`` leaves).
"""

from __future__ import annotations

import base64

from aiohttp import web

from protocol.errors import DecodeError
from relay.app import LOG
from relay.errors import RelayError

__all__ = ["add_log_routes"]

MAX_ENTRIES = 1000
_TEXT = "text/plain"


def add_log_routes(app: web.Application) -> None:
    app.router.add_get("/checkpoint", checkpoint, name="checkpoint")
    app.router.add_get("/log/vkey", vkey, name="log_vkey")
    app.router.add_get("/log/inclusion", inclusion, name="log_inclusion")
    app.router.add_get("/log/consistency", consistency, name="log_consistency")
    app.router.add_get("/log/entries", entries, name="log_entries")


def _int(request: web.Request, name: str) -> int:
    raw = request.query.get(name, "")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or (len(raw) > 1 and raw[0] == "0"):
        raise DecodeError(f"{name} must be a whole number")
    return int(raw)


async def _size(request: web.Request) -> int:
    return await request.app[LOG].size()


async def checkpoint(request: web.Request) -> web.Response:
    _, text = await request.app[LOG].checkpoint()
    return web.Response(text=text, content_type=_TEXT, charset="utf-8", headers={"Cache-Control": "no-store"})


async def vkey(request: web.Request) -> web.Response:
    return web.Response(text=request.app[LOG].verifier.vkey + "\n", content_type=_TEXT, charset="utf-8")


async def inclusion(request: web.Request) -> web.Response:
    index, size = _int(request, "index"), _int(request, "tree_size")
    if not index < size <= await _size(request):
        raise RelayError("not_found", 404, f"no leaf {index} in a tree of size {size} of this log")
    proof = await request.app[LOG].inclusion(index, size)
    return web.json_response(
        {"index": index, "tree_size": size, "proof": [base64.b64encode(h).decode() for h in proof]}
    )


async def consistency(request: web.Request) -> web.Response:
    first, second = _int(request, "first"), _int(request, "second")
    if not first <= second <= await _size(request):
        raise RelayError("not_found", 404, f"no consistency proof from {first} to {second} in this log")
    proof = await request.app[LOG].consistency(first, second)
    return web.json_response(
        {"first": first, "second": second, "proof": [base64.b64encode(h).decode() for h in proof]}
    )


async def entries(request: web.Request) -> web.Response:
    start, end = _int(request, "start"), _int(request, "end")
    size = await _size(request)
    if not start < end or start >= size:
        raise RelayError("not_found", 404, f"no entries [{start}, {end}) in a log of size {size}")
    end = min(end, size, start + MAX_ENTRIES)
    leaves = await request.app[LOG].entries(start, end)
    return web.json_response({"start": start, "entries": [base64.b64encode(leaf).decode() for leaf in leaves]})
