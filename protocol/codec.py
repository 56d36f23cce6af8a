"""Deterministic msgpack encoding and strict decoding (SPEC.md §2).

Why deterministic: test vectors must be reproducible byte for byte, and an object's
hash must not depend on which implementation wrote it. Why strict: a decoder is the
first thing a hostile peer reaches, so it accepts exactly one encoding of each value,
checks every length against a limit before anything is allocated, and refuses types
the formats never use (floats, extension types, non-text map keys).

The canonical form (SPEC.md §2.1):

- integers in their shortest msgpack form (what msgpack-python writes);
- text as ``str`` (valid UTF-8), bytes as ``bin``; no floats, no ext, no nil
  except where a format says so;
- map keys are text, unique, sorted by their UTF-8 bytes.

Decoding re-encodes what it read and compares: any other encoding of the same
values (unsorted or duplicate keys, a long form of a short integer) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from protocol.errors import DecodeError, LimitError, VersionError

__all__ = ["Limits", "MapReader", "decode", "encode", "expect_version"]

_MAX_DEPTH = 16


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Upper bounds applied while decoding, before anything is allocated.

    msgpack-python checks each declared length against these before allocating,
    so a lying length field costs nothing.
    """

    max_size: int = 1 << 20  #: whole encoded object, bytes
    max_str: int = 64 * 1024  #: one text string, bytes
    max_bin: int = 1 << 20  #: one byte string
    max_array: int = 4096  #: items in one array
    max_map: int = 256  #: pairs in one map


DEFAULT_LIMITS = Limits()


def _canonical(obj: Any, depth: int = 0) -> Any:
    """Return ``obj`` with maps rebuilt in canonical key order, refusing foreign types."""
    if depth > _MAX_DEPTH:
        raise DecodeError("nesting too deep")
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, bytes)):
        return obj
    if isinstance(obj, int):
        if not -(1 << 63) <= obj < (1 << 64):
            raise DecodeError("integer out of range")
        return obj
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, depth + 1) for v in obj]
    if isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str):
                raise DecodeError("map keys must be text")
            items.append((k.encode("utf-8"), k, _canonical(v, depth + 1)))
        items.sort(key=lambda t: t[0])
        return {k: v for _, k, v in items}
    raise DecodeError(f"type {type(obj).__name__} has no Pli encoding")


def encode(obj: Any) -> bytes:
    """Encode ``obj`` canonically (SPEC.md §2.1).

    Raises:
        DecodeError: ``obj`` holds a type the formats never use (float, set, ...).
    """
    return msgpack.packb(_canonical(obj), use_bin_type=True)  # type: ignore[no-any-return]


def _refuse_ext(code: int, _data: bytes) -> NoReturn:
    raise DecodeError(f"msgpack extension type {code} is not allowed")


def decode(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode one canonical msgpack object, refusing anything else.

    Raises:
        LimitError: the input or one of its parts is over ``limits``.
        DecodeError: not exactly one canonical msgpack object.
    """
    if len(data) > limits.max_size:
        raise LimitError(f"object of {len(data)} bytes is over the {limits.max_size}-byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_array,
            max_map_len=limits.max_map,
            max_ext_len=0,
        )
    except DecodeError:
        raise
    except ValueError as e:
        # msgpack reports over-limit lengths as ValueError("... exceeds max_..._len").
        # max_ext_len is 0 to refuse extension types, not because of their size.
        if "max_ext_len" in str(e):
            raise DecodeError("msgpack extension types are not allowed") from e
        if "exceeds max" in str(e):
            raise LimitError(f"msgpack length over limit: {e}") from e
        raise DecodeError(f"not valid msgpack: {e}") from e
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"not valid msgpack: {type(e).__name__}") from e
    if isinstance(obj, float) or _has_float(obj):
        raise DecodeError("floating-point numbers are not allowed")
    if encode(obj) != data:
        raise DecodeError("not in canonical form (key order, duplicate key or integer width)")
    return obj


def _has_float(obj: Any, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        raise DecodeError("nesting too deep")
    if isinstance(obj, float):
        return True
    if isinstance(obj, list):
        return any(_has_float(v, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return any(_has_float(v, depth + 1) for v in obj.values())
    return False


class MapReader:
    """Typed, exhaustive access to a decoded map.

    Each getter checks type and bounds and names the field in its error; ``done()``
    refuses fields nobody read, so an unknown field is an error rather than silently
    ignored (SPEC.md §2.2: v1 objects have no optional unknown fields).
    """

    def __init__(self, obj: Any, what: str) -> None:
        if not isinstance(obj, dict):
            raise DecodeError(f"{what}: expected a map")
        self._m: dict[str, Any] = obj
        self._seen: set[str] = set()
        self.what = what

    def _get(self, key: str, *, optional: bool = False) -> Any:
        self._seen.add(key)
        if key not in self._m:
            if optional:
                return None
            raise DecodeError(f"{self.what}: field {key!r} is missing")
        return self._m[key]

    def has(self, key: str) -> bool:
        return key in self._m

    def bytes_(self, key: str, *, size: int | None = None, max_size: int | None = None) -> bytes:
        v = self._get(key)
        if not isinstance(v, bytes):
            raise DecodeError(f"{self.what}: field {key!r} must be bytes")
        if size is not None and len(v) != size:
            raise DecodeError(f"{self.what}: field {key!r} must be {size} bytes, not {len(v)}")
        if max_size is not None and len(v) > max_size:
            raise LimitError(f"{self.what}: field {key!r} is over {max_size} bytes")
        return v

    def int_(self, key: str, *, min_value: int = 0, max_value: int = (1 << 63) - 1) -> int:
        v = self._get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise DecodeError(f"{self.what}: field {key!r} must be an integer")
        if not min_value <= v <= max_value:
            raise DecodeError(f"{self.what}: field {key!r} out of range")
        return v

    def str_(self, key: str, *, max_len: int = 1024, optional: bool = False) -> str:
        v = self._get(key, optional=optional)
        if v is None and optional:
            return ""
        if not isinstance(v, str):
            raise DecodeError(f"{self.what}: field {key!r} must be text")
        if len(v.encode("utf-8")) > max_len:
            raise LimitError(f"{self.what}: field {key!r} is over {max_len} bytes")
        return v

    def list_(self, key: str, *, max_items: int) -> list[Any]:
        v = self._get(key)
        if not isinstance(v, list):
            raise DecodeError(f"{self.what}: field {key!r} must be an array")
        if len(v) > max_items:
            raise LimitError(f"{self.what}: field {key!r} has over {max_items} items")
        return v

    def map_(self, key: str) -> MapReader:
        return MapReader(self._get(key), f"{self.what}.{key}")

    def raw(self, key: str) -> Any:
        return self._get(key)

    def done(self) -> None:
        extra = set(self._m) - self._seen
        if extra:
            raise DecodeError(f"{self.what}: unknown field(s) {sorted(extra)}")


def expect_version(reader: MapReader, supported: Sequence[int]) -> int:
    """Read the ``v`` field first, so an unknown version gets its own error code."""
    v = reader.int_("v", max_value=255)
    if v not in supported:
        raise VersionError(f"{reader.what}: version {v} is not supported (known: {list(supported)})")
    return v
