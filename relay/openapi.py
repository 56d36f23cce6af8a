"""The relay's HTTP API as an OpenAPI 3.1 document (SPEC.md §7, §8, §9, §11.7).

Served, public, at ``GET /openapi.json``. ``tests/test_openapi.py`` keeps it true: every
(path, method) of the route table is here and nothing else is, real requests' statuses
and JSON bodies validate against it, and a fuzzer generated from it finds no 5xx and no
answer outside it. OpenAPI 3.1 schemas are JSON Schema 2020-12.

Every ``GET`` route but the envelope download also answers ``HEAD`` (aiohttp adds it):
those operations are listed too, with the same statuses and no bodies.
"""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

__all__ = ["ERROR_CODES", "OPENAPI_PATH", "PROBLEM_TYPE", "add_openapi_route", "document"]

OPENAPI_PATH = "/openapi.json"
PROBLEM_TYPE = "application/problem+json"
JSON_TYPE = "application/json"
ENVELOPE_TYPE = "application/vnd.pli.envelope"  # relay.routes.ENVELOPE_TYPE (no import: routes imports us)
MSGPACK_TYPE = "application/msgpack"
TEXT_TYPE = "text/plain"

#: SPEC.md §9: every code a refusal carries, with its status (``bad_proof`` is for
#: clients and verifiers; the relay never answers with it).
ERROR_CODES: dict[str, int | None] = {
    "malformed": 400,
    "unsupported_version": 400,
    "too_large": 413,
    "unsupported_media_type": 415,
    "invalid_identifier": 400,
    "bad_signature": 400,
    "bad_proof": None,
    "unauthorized": 401,
    "stale_signature": 401,
    "replayed_request": 401,
    "digest_mismatch": 400,
    "forbidden": 403,
    "invalid_invitation": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "device_exists": 409,
    "envelope_conflict": 409,
    "offset_mismatch": 409,
    "unknown_recipient": 400,
    "expired": 400,
    "unavailable": 503,
    "log_integrity": 503,
    "rate_limited": 429,
    "quota_exceeded": 413,
    "storage_unavailable": 503,
}

_INT63 = {"type": "integer", "minimum": 0, "maximum": (1 << 63) - 1}
_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A closed JSON object: exactly these members (``optional`` ones may be absent)."""
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": False,
        **extra,
    }


_SCHEMAS: dict[str, Any] = {
    "HexId": {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "16 bytes as 32 lowercase hex digits"},
    "Base64": {"type": "string", "pattern": "^[A-Za-z0-9+/]*={0,2}$", "contentEncoding": "base64"},
    "Rpps": {"type": "string", "pattern": "^[0-9]{11}$", "description": "RPPS number: 11 digits, Luhn check digit"},
    "UnixTime": {**_INT63, "description": "Unix seconds"},
    "Problem": _obj(
        {
            "type": {"type": "string", "pattern": "^https://pli\\.invalid/errors/[a-z_]+$"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "code": {"type": "string", "enum": list(ERROR_CODES)},
        },
        {"offset": {**_INT63, "description": "offset_mismatch only: the ciphertext bytes the relay holds"}},
        description="RFC 9457 problem document; `code` is the stable machine-readable part (SPEC.md §9).",
    ),
    "Receipt": _obj(
        {
            "type": {"enum": ["submitted", "delivered", "read", "answered", "device_enrolled", "device_revoked"]},
            "index": _INT63,
            "leaf": _ref("Base64"),
            "proof": {"type": "string", "description": "c2sp.org/tlog-proof@v1 text with its signed checkpoint"},
        },
        description="A log leaf and the proof that the log holds it (SPEC.md §11.5).",
    ),
    "Health": _obj({"status": {"const": "ok"}}),
    "Ready": _obj({
        "status": {"const": "ready"},
        "checks": _obj({
            "database": {"const": "ok", "description": "the database answered and took a write"},
            "blobs": {"const": "ok", "description": "the blob folder took a file"},
            "log": {"const": "ok", "description": "the log has not failed an integrity check"},
            "stopping": {"const": "no", "description": "the relay is not shutting down"},
        }),
    }),
    "Enrolment": _obj(
        {
            "v": {"const": 1},
            "code": {"type": "string", "maxLength": 64, "description": "the invitation code"},
            "device": _obj(
                {"sign_key": {"type": "string"}, "cert": {"type": "string"}, "sig": {"type": "string"}},
                description="device record (SPEC.md §3.2); each member is msgpack bin",
            ),
        },
        description="canonical msgpack (SPEC.md §2.1, §7.2)",
    ),
    "Enrolled": _obj({
        "device_id": _ref("HexId"),
        "rpps": _ref("Rpps"),
        "name": {"type": "string"},
        "profession": {"type": "string"},
        "specialty": {"type": "string"},
        "log_vkey": {"type": "string"},
        "log_origin": {"type": "string"},
        "receipt": _ref("Receipt"),
    }),
    "DirectoryDevice": _obj({
        "device_id": _ref("HexId"),
        "sign_key": _ref("Base64"),
        "cert": _ref("Base64"),
        "sig": _ref("Base64"),
        "fingerprint": {"type": "string"},
        "receipts": {"type": "array", "items": _ref("Receipt")},
    }),
    "Directory": _obj({
        "rpps": _ref("Rpps"),
        "name": {"type": "string"},
        "profession": {"type": "string"},
        "specialty": {"type": "string"},
        "devices": {"type": "array", "items": _ref("DirectoryDevice")},
    }),
    "DeviceInfo": _obj({
        "device_id": _ref("HexId"),
        "rpps": _ref("Rpps"),
        "name": {"type": "string"},
        "sign_key": _ref("Base64"),
        "cert": _ref("Base64"),
        "sig": _ref("Base64"),
        "fingerprint": {"type": "string"},
        "revoked": {"type": "boolean"},
        "receipts": {"type": "array", "items": _ref("Receipt")},
    }),
    "Inbox": _obj({
        "envelopes": {
            "type": "array",
            "items": _obj({
                "id": _ref("HexId"),
                "from": _ref("HexId"),
                "from_rpps": _ref("Rpps"),
                "size": _INT63,
                "created": _ref("UnixTime"),
                "expires": _ref("UnixTime"),
                "received_at": _ref("UnixTime"),
                "envelope_hash": _ref("Base64"),
            }),
        }
    }),
    "UploadState": _obj(
        {
            "id": _ref("HexId"),
            "complete": {"type": "boolean"},
            "offset": {**_INT63, "description": "ciphertext bytes the relay holds"},
            "size": _INT63,
            "envelope_hash": _ref("Base64"),
            "received_at": {"oneOf": [_ref("UnixTime"), {"type": "null"}]},
            "receipt": {"oneOf": [_ref("Receipt"), {"type": "null"}], "description": "submitted, once complete"},
        },
    ),
    "Acknowledged": _obj({
        "id": _ref("HexId"),
        "acknowledged": {"const": True},
        "deleted": {"type": "boolean"},
        "receipt": _ref("Receipt"),
    }),
    "ReadStatement": _obj({"read_at": _ref("UnixTime"), "signature": _ref("Base64")}),
    "AnsweredStatement": _obj({
        "answer": {**_ref("HexId"), "description": "the answering envelope, sent by this device"},
        "answered_at": _ref("UnixTime"),
        "signature": _ref("Base64"),
    }),
    "StatementReceipt": _obj({"receipt": _ref("Receipt")}),
    "Receipts": _obj({"id": _ref("HexId"), "receipts": {"type": "array", "items": _ref("Receipt")}}),
    "InclusionProof": _obj({
        "index": _INT63, "tree_size": _INT63, "proof": {"type": "array", "items": _ref("Base64")},
    }),
    "ConsistencyProof": _obj({
        "first": _INT63, "second": _INT63, "proof": {"type": "array", "items": _ref("Base64")},
    }),
    "Entries": _obj({
        "start": _INT63, "entries": {"type": "array", "items": _ref("Base64"), "maxItems": 1000},
    }),
    "Bytes": {"type": "string", "format": "binary"},
}

_STATUS_TEXT = {
    400: "Malformed request", 401: "Missing or invalid request signature (SPEC.md §8)",
    403: "Not allowed", 404: "No such resource visible to this device", 409: "Conflict",
    413: "Body over its limit, or envelope over the device's quota", 415: "Wrong Content-Type",
    416: "Range not satisfiable", 429: "Too many requests (this device's rate, or wrong invitation codes)",
    503: "The relay cannot serve this right now (busy, storage full or not writable, log integrity)",
}
_RESPONSE_NAMES = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
    413: "TooLarge", 415: "UnsupportedMediaType", 416: "RangeNotSatisfiable", 429: "TooManyRequests",
    503: "Unavailable",
}
_RETRY_AFTER = {"schema": {"type": "string", "pattern": "^[0-9]+$"},
                "description": "seconds to wait before trying again"}


def _codes(status: int) -> list[str]:
    if status == 416:
        return ["malformed"]  # SPEC.md §7.5: a range past the end
    return [c for c, s in ERROR_CODES.items() if s == status]


def _problem_response(status: int) -> dict[str, Any]:
    schema = {
        "allOf": [
            _ref("Problem"),
            {"properties": {"status": {"const": status}, "code": {"enum": _codes(status)}}},
        ]
    }
    out: dict[str, Any] = {
        "description": f"{_STATUS_TEXT[status]}: `code` is one of {', '.join(_codes(status))}",
        "content": {PROBLEM_TYPE: {"schema": schema}},
    }
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"const": 'Signature realm="pli"'}}}
    elif status == 429:
        out["headers"] = {"Retry-After": {"required": True, **_RETRY_AFTER}}
    elif status == 503:  # every 503 but log_integrity (which waits for an operator) says when
        out["headers"] = {"Retry-After": {"required": False, **_RETRY_AFTER}}
    return out


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON_TYPE: {"schema": _ref(name)}}}


def _op(
    op_id: str,
    summary: str,
    ok: dict[int, dict[str, Any]],
    refusals: tuple[int, ...],
    *,
    public: bool = False,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    tag: str = "mailbox",
) -> dict[str, Any]:
    # Any operation may meet a relay at its connection limit (503); a signed one, the
    # device's rate limit (429).
    auth = (503,) if public else (401, 429, 503)
    responses: dict[str, Any] = {str(s): r for s, r in ok.items()}
    for status in sorted({*refusals, *auth}):
        responses[str(status)] = {"$ref": f"#/components/responses/{_RESPONSE_NAMES[status]}"}
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": [tag], "responses": responses}
    if public:
        op["security"] = []
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    return op


def _path_param(name: str, schema: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": _ref(schema)}


def _query_int(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name, "in": "query", "required": True,
        "schema": {"type": "integer", "minimum": 0, "maximum": 10**19 - 1},
        "description": f"{description}; decimal ASCII, at most 19 digits, no sign or leading zero (else 400 malformed)",
    }


_ID = _path_param("id", "HexId", "the envelope id")
_BODY_GET = (400, 413)  # a GET that carries a body: refused (413), or its digest does not match (400)


def _paths() -> dict[str, dict[str, Any]]:
    envelope_state = {
        200: _json("UploadState", "The upload's state (not complete, or complete before this request)"),
        201: _json("UploadState", "This request completed the envelope: stored and logged, with its receipt"),
    }
    statement = {
        201: _json("StatementReceipt", "Logged now"),
        200: _json("StatementReceipt", "Logged before: the same receipt"),
    }
    return {
        "/healthz": {"get": _op("health", "Liveness", {200: _json("Health", "The relay is up")}, (),
                                public=True, tag="public")},
        "/livez": {"get": _op("livez", "Liveness: the process answers (nothing else is checked)",
                              {200: _json("Health", "The relay is up")}, (), public=True, tag="operations")},
        "/readyz": {"get": _op(
            "readyz", "Readiness: database reachable and writable, blob folder writable, log sound, not stopping",
            {200: _json("Ready", "Ready to serve")}, (), public=True, tag="operations",
        )},
        "/metrics": {"get": _op(
            "metrics", "Prometheus metrics (text format); who may read them: setting `metrics` (local, on, off)",
            {200: {"description": "Prometheus text exposition format 0.0.4",
                   "content": {TEXT_TYPE: {"schema": {"type": "string"}}}}},
            (403, 404), public=True, tag="operations",
        )},
        OPENAPI_PATH: {"get": _op("openapi", "This document", {200: {
            "description": "The relay's OpenAPI 3.1 document",
            "content": {JSON_TYPE: {"schema": {"type": "object", "required": ["openapi", "paths"]}}},
        }}, (), public=True, tag="public")},
        "/v1/enroll": {"post": _op(
            "enroll", "Enrol a device with a one-time invitation code (SPEC.md §7.2)",
            {201: _json("Enrolled", "Enrolled: the practitioner, the log's identity and the enrolment receipt")},
            (400, 403, 409, 413, 415, 429, 503), public=True, tag="public",
            body={"required": True, "content": {MSGPACK_TYPE: {"schema": _ref("Enrolment")}}},
        )},
        "/v1/directory/{rpps}": {"get": _op(
            "directory", "A practitioner's active devices, each with its log receipts (SPEC.md §7.3)",
            {200: _json("Directory", "The practitioner and their active devices")}, (400, 404, 503),
            params=[_path_param("rpps", "Rpps", "RPPS number (also accepted: spaces, the 12-digit 8+RPPS form)")],
            tag="directory",
        )},
        "/v1/devices/{device_id}": {"get": _op(
            "device", "One device, revoked or not, with its log receipts (SPEC.md §7.3)",
            {200: _json("DeviceInfo", "The device")}, (400, 404, 503),
            params=[_path_param("device_id", "HexId", "the device id")], tag="directory",
        )},
        "/v1/inbox": {"get": _op(
            "inbox", "Complete, unexpired, unacknowledged envelopes for this device, oldest first (SPEC.md §7.5)",
            {200: _json("Inbox", "The envelopes")}, _BODY_GET,
            params=[{
                "name": "wait", "in": "query", "required": False,
                "schema": {"type": "integer", "minimum": 0, "maximum": 60},
                "description": "long poll: when the inbox is empty, answer as soon as new mail arrives (on any "
                               "relay node) or after this many seconds (at most 60, or the relay's "
                               "max_inbox_wait); decimal, no sign or leading zero (else 400 malformed)",
            }],
        )},
        "/v1/envelopes/{id}": {
            "put": _op(
                "put_envelope", "Start (or retry) an upload: the signed prefix, then ciphertext (SPEC.md §7.4)",
                envelope_state, (400, 409, 413, 415, 503), params=[_ID],
                body={"required": True, "content": {ENVELOPE_TYPE: {"schema": _ref("Bytes")}}}, tag="upload",
            ),
            "patch": _op(
                "patch_envelope", "Append ciphertext bytes at `offset` (SPEC.md §7.4)",
                envelope_state, (400, 404, 409, 413, 415, 503),
                params=[_ID, _query_int("offset", "the ciphertext offset the bytes start at")],
                body={"required": True, "content": {"application/octet-stream": {"schema": _ref("Bytes")}}},
                tag="upload",
            ),
            "get": _op(
                "get_envelope", "Download the whole envelope, or from a byte with Range (SPEC.md §7.5)",
                {
                    200: {"description": "The envelope: prefix then ciphertext",
                          "content": {ENVELOPE_TYPE: {"schema": _ref("Bytes")}}},
                    206: {"description": "The requested range of the envelope",
                          "headers": {"Content-Range": {"required": True, "schema": {"type": "string"}}},
                          "content": {ENVELOPE_TYPE: {"schema": _ref("Bytes")}}},
                    304: {"description": "Not modified (If-None-Match, If-Modified-Since); no body"},
                    412: {"description": "Precondition failed (If-Match, If-Unmodified-Since); no body"},
                },
                (*_BODY_GET, 404, 416), params=[_ID, {
                    "name": "Range", "in": "header", "required": False,
                    "schema": {"type": "string", "pattern": "^[\\t\\x20-\\x7e]*$"},
                    "description": "`bytes=N-` resumes from byte N; a range the envelope cannot satisfy is 416",
                }],
            ),
        },
        "/v1/envelopes/{id}/status": {"get": _op(
            "envelope_status", "The upload's state, for the uploader or a recipient (SPEC.md §7.4)",
            {200: _json("UploadState", "The state")}, (*_BODY_GET, 404, 503), params=[_ID], tag="upload",
        )},
        "/v1/envelopes/{id}/ack": {"post": _op(
            "ack_envelope", "A recipient acknowledges delivery (SPEC.md §7.5)",
            {200: _json("Acknowledged", "Acknowledged (twice is harmless), with the delivered receipt")},
            (400, 403, 404, 413, 503), params=[_ID],
        )},
        "/v1/envelopes/{id}/read": {"post": _op(
            "read_envelope", "A recipient's signed statement that it opened the envelope (SPEC.md §11.7)",
            statement, (400, 403, 404, 413, 415, 503), params=[_ID], tag="log",
            body={"required": True, "content": {JSON_TYPE: {"schema": _ref("ReadStatement")}}},
        )},
        "/v1/envelopes/{id}/answered": {"post": _op(
            "answered_envelope", "A recipient's signed statement of which envelope answers this one (SPEC.md §11.7)",
            statement, (400, 403, 404, 413, 415, 503), params=[_ID], tag="log",
            body={"required": True, "content": {JSON_TYPE: {"schema": _ref("AnsweredStatement")}}},
        )},
        "/v1/envelopes/{id}/receipts": {"get": _op(
            "envelope_receipts", "Every logged fact about an envelope, against the latest checkpoint (SPEC.md §11.7)",
            {200: _json("Receipts", "The receipts")}, (*_BODY_GET, 404, 503), params=[_ID], tag="log",
        )},
        "/checkpoint": {"get": _op(
            "checkpoint", "The latest signed checkpoint (SPEC.md §11.4)",
            {200: {"description": "The signed note, verbatim",
                   "content": {TEXT_TYPE: {"schema": {"type": "string"}}}}},
            (503,), public=True, tag="log",
        )},
        "/log/vkey": {"get": _op(
            "log_vkey", "The log's verifier key",
            {200: {"description": "The verifier key and a newline",
                   "content": {TEXT_TYPE: {"schema": {"type": "string"}}}}},
            (), public=True, tag="log",
        )},
        "/log/inclusion": {"get": _op(
            "log_inclusion", "Inclusion proof of leaf `index` in the tree of size `tree_size`",
            {200: _json("InclusionProof", "The proof")}, (400, 404, 503), public=True, tag="log",
            params=[_query_int("index", "the leaf"), _query_int("tree_size", "the tree size (at most the log's)")],
        )},
        "/log/consistency": {"get": _op(
            "log_consistency", "Consistency proof between two tree sizes",
            {200: _json("ConsistencyProof", "The proof")}, (400, 404, 503), public=True, tag="log",
            params=[_query_int("first", "the smaller size"), _query_int("second", "the larger size")],
        )},
        "/log/entries": {"get": _op(
            "log_entries", "Leaves [start, end), at most 1000",
            {200: _json("Entries", "The leaves")}, (400, 404, 503), public=True, tag="log",
            params=[_query_int("start", "the first leaf"), _query_int("end", "one past the last leaf wanted")],
        )},
    }


#: GET operations aiohttp does not also serve as HEAD (``allow_head=False``)
_NO_HEAD = frozenset({"get_envelope"})


def _with_head(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add the HEAD twin of each GET: same parameters and statuses, no bodies."""
    for item in paths.values():
        get = item.get("get")
        if get is None or get["operationId"] in _NO_HEAD:
            continue
        head = copy.deepcopy(get)
        head["operationId"] = get["operationId"] + "_head"
        head["summary"] = f"HEAD of: {get['summary']}"
        for status, resp in list(head["responses"].items()):
            if "$ref" in resp:
                name = resp["$ref"].rsplit("/", 1)[1]
                head["responses"][status] = {"$ref": f"#/components/responses/{name}Head"}
            else:
                resp.pop("content", None)
        item["head"] = head
    return paths


def document() -> dict[str, Any]:
    """The whole document (a fresh copy each time)."""
    responses: dict[str, Any] = {}
    for status, name in _RESPONSE_NAMES.items():
        resp = _problem_response(status)
        responses[name] = resp
        head = {k: v for k, v in resp.items() if k != "content"}
        responses[name + "Head"] = copy.deepcopy(head)
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "Pli relay",
            "version": "1",
            "summary": "End-to-end encrypted téléexpertise cases: the relay's HTTP API v1 (protocol/SPEC.md §7-§11).",
            "description": (
                "Bodies are JSON (ids as lowercase hex, bytes as base64) except envelope uploads and downloads "
                f"(`{ENVELOPE_TYPE}`) and enrolment (`{MSGPACK_TYPE}`). Every refusal is `{PROBLEM_TYPE}` "
                "(RFC 9457) with a stable `code` (SPEC.md §9). A method a path does not serve is `405 "
                "method_not_allowed` with an `Allow` header; an unknown path is `404 not_found`."
            ),
            "license": {"name": "AGPL-3.0-or-later", "identifier": "AGPL-3.0-or-later"},
        },
        "tags": [
            {"name": "public", "description": "No signature needed"},
            {"name": "directory", "description": "Practitioners and their devices"},
            {"name": "upload", "description": "Resumable envelope upload"},
            {"name": "mailbox", "description": "Inbox, download, acknowledgement"},
            {"name": "log", "description": "Transparency log: receipts, proofs, signed statements"},
            {"name": "operations", "description": "Probes and metrics for the relay's operator (no signature)"},
        ],
        "security": [{"httpSignature": []}],
        "paths": _with_head(_paths()),
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "responses": responses,
            "securitySchemes": {
                "httpSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Signature",
                    "description": (
                        "HTTP Message Signatures (RFC 9421) in Pli's fixed profile (SPEC.md §8); OpenAPI has no "
                        "RFC 9421 scheme type, so it is described here. Each request carries three headers: "
                        '`Signature-Input: pli=("@method" "@authority" "@path" "@query" "content-digest")'
                        ';created=<unix s>;keyid="<device id, 32 hex>";nonce="<16-48 random bytes, base64url>"'
                        ';alg="ed25519"`, `Signature: pli=:<base64 Ed25519 signature over the RFC 9421 signature '
                        "base>:` and `Content-Digest: sha-256=:<base64 SHA-256 of the body as sent>:` (RFC 9530). "
                        "The key is an enrolled, non-revoked device's; `created` within 300 s of the relay's clock; "
                        "a nonce is accepted once. Failures are 401 (`unauthorized`, `stale_signature`, "
                        "`replayed_request`); a body that does not match its Content-Digest is 400 `digest_mismatch`."
                    ),
                }
            },
        },
    }


_DOCUMENT = document()


async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(_DOCUMENT)


def add_openapi_route(app: web.Application) -> None:
    app.router.add_get(OPENAPI_PATH, openapi, name="openapi")
