"""The relay's OpenAPI document (relay/openapi.py) stays true to the relay.

Three guards, each against a real relay:

- the route table and the document list the same (path, method) pairs, both ways, so a
  new endpoint cannot be forgotten (nor a removed one linger);
- real requests — enrolment, directory, upload, download, inbox, acknowledgement, signed
  statements, receipts, the log's endpoints, and refusals — answer with a status the
  document lists for that operation, a media type it lists for that status, and a JSON
  body that validates against its schema (JSON Schema 2020-12, ``jsonschema``);
- schemathesis, driven by the document, fuzzes every operation on a relay on loopback,
  once with requests signed (RFC 9421) by real enrolled devices so the fuzz reaches the
  handlers, once unsigned, and finds no 5xx and no answer outside the document.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import requests
from conftest import CARDIO, DERM, GP, PROBLEM_TYPE, Relay, Reply, make_envelope, send_raw, sign_headers
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from protocol import codec, httpsig
from protocol.envelope import split_prefix
from protocol.keys import DeviceKeys
from protocol.logentry import sign_answered, sign_read
from relay.app import PUBLIC_ROUTES, STORAGE, create_app
from relay.cli import new_invitation_code
from relay.config import RelayConfig
from relay.openapi import ERROR_CODES, OPENAPI_PATH, document
from relay.routes import ENVELOPE_TYPE
from relay.storage import Practitioner

DOC = document()
#: examples per operation and mode; raise it for a deeper local run (PLI_FUZZ_EXAMPLES=500)
FUZZ_EXAMPLES = int(os.environ.get("PLI_FUZZ_EXAMPLES", "25"))
_DOC_URI = "urn:pli:relay-openapi"
_REGISTRY = Registry().with_resource(_DOC_URI, Resource.from_contents(DOC, default_specification=DRAFT202012))
_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "trace")


def _app_operations() -> set[tuple[str, str]]:
    app = create_app(RelayConfig(data=Path("never-created")))
    return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}


def _doc_operations() -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in DOC["paths"].items() for m in item if m in _METHODS}


# -- the document and the route table ------------------------------------------------------


def test_document_lists_exactly_the_route_table() -> None:
    app_ops, doc_ops = _app_operations(), _doc_operations()
    assert len(app_ops) > 20  # the table was read (guards against an empty comparison)
    assert app_ops - doc_ops == set(), "endpoints the OpenAPI document (relay/openapi.py) does not describe"
    assert doc_ops - app_ops == set(), "operations in the OpenAPI document the relay does not serve"


def test_public_routes_are_exactly_the_unsigned_operations() -> None:
    app = create_app(RelayConfig(data=Path("never-created")))
    public = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.name in PUBLIC_ROUTES}
    unsigned = {(m.upper(), path) for path, item in DOC["paths"].items() for m, op in item.items()
                if m in _METHODS and op.get("security") == []}
    assert public == unsigned
    signed = _doc_operations() - unsigned
    for method, path in signed:
        assert "401" in DOC["paths"][path][method.lower()]["responses"], (method, path)


def test_error_codes_are_those_of_spec_section_9() -> None:
    spec = (Path(__file__).parents[1] / "protocol" / "SPEC.md").read_text(encoding="utf-8")
    section = spec.split("## 9. Error codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}|—) \|", section, flags=re.MULTILINE)
    assert rows
    assert {code: (int(status) if status.isdigit() else None) for code, status in rows} == ERROR_CODES
    assert DOC["components"]["schemas"]["Problem"]["properties"]["code"]["enum"] == list(ERROR_CODES)


def test_document_is_well_formed() -> None:
    assert DOC["openapi"].startswith("3.1.")
    for schema in DOC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)  # each one a JSON Schema 2020-12
    ids = [op["operationId"] for item in DOC["paths"].values() for m, op in item.items() if m in _METHODS]
    assert len(ids) == len(set(ids))
    # Every reference resolves.
    text = json.dumps(DOC)
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node: Any = DOC
        for part in ref.split("/"):
            node = node[part]
    # Path parameters are declared for each {name} of their path, and only those.
    for path, item in DOC["paths"].items():
        for m, op in item.items():
            if m in _METHODS:
                declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
                assert declared == set(re.findall(r"\{([^}]+)\}", path)), (m, path)


async def test_document_is_served(relay: Relay) -> None:
    r = await send_raw(relay.session, "GET", relay.u(OPENAPI_PATH))
    assert r.status == 200
    assert r.content_type == "application/json"
    assert r.json() == DOC
    conform(r, "GET", OPENAPI_PATH)


# -- real requests answer as the document says --------------------------------------------


def _find_operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    for template, item in DOC["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return template, item[method.lower()]
    raise AssertionError(f"{method} {path}: no such operation in the document")


def _deref(node: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
    while "$ref" in node:
        pointer = node["$ref"]
        node = DOC
        for part in pointer.removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node, pointer


def _escape(s: str) -> str:
    return s.replace("~", "~0").replace("/", "~1")


def conform(reply: Reply, method: str, url_path: str) -> None:
    """The answer is one the document lists for this operation, and its body fits the schema."""
    path = urllib.parse.urlsplit(url_path).path
    template, op = _find_operation(method, path)
    label = f"{method} {path} -> {reply.status}: {reply.body[:300]!r}"
    assert str(reply.status) in op["responses"], f"status not documented: {label}"
    pointer = f"#/paths/{_escape(template)}/{method.lower()}/responses/{reply.status}"
    resp, pointer = _deref(op["responses"][str(reply.status)], pointer)
    for name, header in resp.get("headers", {}).items():
        if header.get("required"):
            assert name in reply.headers, f"missing header {name}: {label}"
    content = resp.get("content")
    if not content:
        assert reply.body == b"", f"a body where the document says none: {label}"
        return
    assert reply.content_type in content, f"media type {reply.content_type} not documented: {label}"
    if reply.content_type in {"application/json", PROBLEM_TYPE}:
        schema_ptr = f"{pointer}/content/{_escape(reply.content_type)}/schema"
        validator = Draft202012Validator({"$ref": _DOC_URI + schema_ptr}, registry=_REGISTRY)
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(reply.json())]
        assert not errors, f"{label}\n" + "\n".join(errors)


class Checked:
    """Sends requests to ``relay`` and checks every answer against the document."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.seen: set[tuple[str, str, int]] = set()

    def _record(self, reply: Reply, method: str, path: str) -> Reply:
        conform(reply, method, path)
        template, _ = _find_operation(method, urllib.parse.urlsplit(path).path)
        self.seen.add((method, template, reply.status))
        return reply

    async def signed(self, keys: DeviceKeys, method: str, path: str, body: bytes = b"", **kw: Any) -> Reply:
        return self._record(await self.relay.signed(keys, method, path, body, **kw), method, path)

    async def raw(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Reply:
        return self._record(await send_raw(self.relay.session, method, self.relay.u(path), body, headers=headers),
                            method, path)


def _enrol_body(code: str, keys: DeviceKeys) -> bytes:
    return codec.encode({"v": 1, "code": code, "device": keys.public().to_record()})


async def test_real_requests_answer_as_documented(relay: Relay) -> None:
    c = Checked(relay)
    now = relay.clock()
    msgpack_h = {"Content-Type": "application/msgpack"}

    # Public: health, enrolment and its refusals.
    assert (await c.raw("GET", "/healthz")).status == 200
    assert (await c.raw("HEAD", "/healthz")).status == 200
    # Operations (relay.ops): probes, and metrics for a loopback client (the default `metrics = local`).
    for path in ("/livez", "/readyz", "/metrics"):
        assert (await c.raw("GET", path)).status == 200
    gp_keys = DeviceKeys.generate(now=now)
    code = await relay.invite(GP)
    assert (await c.raw("POST", "/v1/enroll", _enrol_body(code, gp_keys), msgpack_h)).status == 201
    assert (await c.raw("POST", "/v1/enroll", _enrol_body(code, gp_keys), msgpack_h)).status == 403
    assert (await c.raw("POST", "/v1/enroll", _enrol_body(await relay.invite(GP), gp_keys), msgpack_h)).status == 409
    assert (await c.raw("POST", "/v1/enroll", b"\xc1", msgpack_h)).status == 400
    assert (await c.raw("POST", "/v1/enroll", b"{}", {"Content-Type": "application/json"})).status == 415
    assert (await c.raw("POST", "/v1/enroll", b"\x00" * 5000, msgpack_h)).status == 413
    derm = await relay.enroll(DERM)
    cardio = await relay.enroll(CARDIO)

    # Directory.
    assert (await c.signed(gp_keys, "GET", f"/v1/directory/{DERM}")).status == 200
    assert (await c.signed(gp_keys, "HEAD", f"/v1/directory/{DERM}")).status == 200
    assert (await c.signed(gp_keys, "GET", "/v1/directory/10000000000")).status == 400
    assert (await c.signed(gp_keys, "GET", "/v1/directory/10000045678")).status in {400, 404}
    assert (await c.signed(gp_keys, "GET", f"/v1/devices/{derm.hex}")).status == 200
    assert (await c.signed(gp_keys, "GET", f"/v1/devices/{os.urandom(16).hex()}")).status == 404
    assert (await c.signed(gp_keys, "GET", "/v1/devices/XYZ")).status == 400

    # Upload in two requests, with the refusals on the way.
    ct = os.urandom(3000)
    eid, prefix = make_envelope(gp_keys, [derm.device_id], ct, now=now)
    put = f"/v1/envelopes/{eid.hex()}"
    assert (await c.signed(gp_keys, "PUT", put, prefix + ct[:1000], content_type=ENVELOPE_TYPE)).status == 200
    r = await c.signed(gp_keys, "PATCH", f"{put}?offset=5", ct[5:10], content_type="application/octet-stream")
    assert r.status == 409
    assert r.json()["offset"] == 1000
    assert (await c.signed(gp_keys, "PATCH", f"{put}?offset=01", b"x",
                           content_type="application/octet-stream")).status == 400
    assert (await c.signed(gp_keys, "PATCH", f"{put}?offset=1000", b"x", content_type="text/plain")).status == 415
    assert (await c.signed(derm.keys, "PATCH", f"{put}?offset=1000", ct[1000:],
                           content_type="application/octet-stream")).status == 404
    assert (await c.signed(gp_keys, "GET", f"{put}/status")).status == 200
    assert (await c.signed(gp_keys, "PATCH", f"{put}?offset=1000", ct[1000:],
                           content_type="application/octet-stream")).status == 201
    assert (await c.signed(gp_keys, "PUT", put, prefix, content_type=ENVELOPE_TYPE)).status == 200  # a retry
    _, other = make_envelope(gp_keys, [derm.device_id], b"other", now=now, envelope_id=eid)
    assert (await c.signed(gp_keys, "PUT", put, other + b"other", content_type=ENVELOPE_TYPE)).status == 409
    assert (await c.signed(gp_keys, "PUT", put, prefix, content_type="application/json")).status == 415
    assert (await c.signed(gp_keys, "PUT", put, b"garbage", content_type=ENVELOPE_TYPE)).status == 400
    eid2, prefix2 = make_envelope(gp_keys, [os.urandom(16)], b"ct", now=now)
    assert (await c.signed(gp_keys, "PUT", f"/v1/envelopes/{eid2.hex()}", prefix2 + b"ct",
                           content_type=ENVELOPE_TYPE)).status == 400  # unknown_recipient

    # Mailbox, download with and without Range, and who may see what.
    assert (await c.signed(derm.keys, "GET", "/v1/inbox")).status == 200
    assert (await c.signed(derm.keys, "HEAD", "/v1/inbox")).status == 200
    assert (await c.signed(derm.keys, "GET", f"{put}/status")).status == 200
    assert (await c.signed(derm.keys, "GET", put)).status == 200
    assert (await c.signed(derm.keys, "GET", put, headers={"Range": "bytes=100-"})).status == 206
    assert (await c.signed(derm.keys, "GET", put, headers={"Range": "bytes=999999-"})).status == 416
    assert (await c.signed(derm.keys, "GET", put, headers={"Range": "lines=1-"})).status == 416
    assert (await c.signed(cardio.keys, "GET", put)).status == 404
    assert (await c.signed(derm.keys, "GET", f"/v1/envelopes/{'A' * 32}")).status == 400

    # Signed statements: read, answered (with an answer envelope), receipts.
    signed_header, _ = split_prefix(prefix) or (None, 0)
    assert signed_header is not None
    h = signed_header.envelope_hash
    read = json.dumps({"read_at": now, "signature": base64.b64encode(sign_read(derm.keys.signing_key, h, now))
                       .decode()}).encode()
    jh = {"content_type": "application/json"}
    assert (await c.signed(derm.keys, "POST", f"{put}/read", read, **jh)).status == 201
    assert (await c.signed(derm.keys, "POST", f"{put}/read", read, **jh)).status == 200
    assert (await c.signed(gp_keys, "POST", f"{put}/read", read, **jh)).status == 403
    bad = json.dumps({"read_at": now + 1, "signature": base64.b64encode(bytes(64)).decode()}).encode()
    assert (await c.signed(derm.keys, "POST", f"{put}/read", bad, **jh)).status == 400
    assert (await c.signed(derm.keys, "POST", f"{put}/read", read, content_type="text/plain")).status == 415
    assert (await c.signed(derm.keys, "POST", f"{put}/read", b"[1]", **jh)).status == 400
    ans_ct = os.urandom(100)
    aid, aprefix = make_envelope(derm.keys, [gp_keys.device_id], ans_ct, now=now)
    assert (await c.signed(derm.keys, "PUT", f"/v1/envelopes/{aid.hex()}", aprefix + ans_ct,
                           content_type=ENVELOPE_TYPE)).status == 201
    ah = (split_prefix(aprefix) or (None, 0))[0]
    assert ah is not None
    answered = json.dumps({"answer": aid.hex(), "answered_at": now, "signature": base64.b64encode(
        sign_answered(derm.keys.signing_key, h, ah.envelope_hash, now)).decode()}).encode()
    assert (await c.signed(derm.keys, "POST", f"{put}/answered", answered, **jh)).status == 201
    assert (await c.signed(derm.keys, "POST", f"{put}/answered", answered, **jh)).status == 200
    no_answer = json.dumps({"answer": os.urandom(16).hex(), "answered_at": now,
                            "signature": base64.b64encode(bytes(64)).decode()}).encode()
    assert (await c.signed(derm.keys, "POST", f"{put}/answered", no_answer, **jh)).status == 404
    assert (await c.signed(gp_keys, "GET", f"{put}/receipts")).status == 200
    assert (await c.signed(gp_keys, "HEAD", f"{put}/receipts")).status == 200

    # Acknowledgement (twice is harmless; only a recipient acknowledges), then it is gone.
    assert (await c.signed(gp_keys, "POST", f"{put}/ack")).status == 403
    assert (await c.signed(derm.keys, "POST", f"{put}/ack")).status == 200
    assert (await c.signed(derm.keys, "POST", f"{put}/ack")).status == 200
    assert (await c.signed(derm.keys, "GET", put)).status == 404
    assert (await c.signed(derm.keys, "POST", f"/v1/envelopes/{os.urandom(16).hex()}/ack")).status == 404

    # The log's public endpoints.
    assert (await c.raw("GET", "/checkpoint")).status == 200
    assert (await c.raw("HEAD", "/checkpoint")).status == 200
    assert (await c.raw("GET", "/log/vkey")).status == 200
    assert (await c.raw("GET", "/log/inclusion?index=0&tree_size=2")).status == 200
    assert (await c.raw("GET", "/log/inclusion?index=2&tree_size=2")).status == 404
    assert (await c.raw("GET", "/log/inclusion?index=-1&tree_size=2")).status == 400
    assert (await c.raw("GET", "/log/consistency?first=1&second=3")).status == 200
    assert (await c.raw("GET", "/log/consistency?first=3&second=1")).status == 404
    assert (await c.raw("GET", "/log/consistency?first=1")).status == 400
    assert (await c.raw("GET", "/log/entries?start=0&end=100")).status == 200
    assert (await c.raw("GET", "/log/entries?start=100&end=101")).status == 404
    assert (await c.raw("GET", "/log/entries?start=00&end=1")).status == 400
    assert (await c.raw("HEAD", "/log/entries?start=0&end=1")).status == 200

    # Refusals of the signature layer and of bodies where none belongs.
    assert (await c.raw("GET", "/v1/inbox")).status == 401
    assert (await c.raw("HEAD", "/v1/inbox")).status == 401
    assert (await c.signed(derm.keys, "GET", "/v1/inbox", created=now - 3600)).status == 401
    headers = sign_headers(derm.keys, "GET", relay.u("/v1/inbox"), created=now)
    assert (await c.raw("GET", "/v1/inbox", headers=headers)).status == 200
    assert (await c.raw("GET", "/v1/inbox", headers=headers)).status == 401  # replayed
    assert (await c.signed(derm.keys, "GET", "/v1/inbox", b"a body")).status == 413
    assert (await c.signed(derm.keys, "POST", f"{put}/read", read, digest_of=b"else", **jh)).status == 400

    # Every operation was exercised (HEAD twins of signed GETs, and the two that
    # need a failing disk or log to answer 503, aside).
    exercised = {(m, t) for m, t, _ in c.seen}
    assert {(m, p) for m, p in _doc_operations() if m != "HEAD"} - {("GET", OPENAPI_PATH)} <= exercised


# -- the fuzzer ----------------------------------------------------------------------------


class LiveRelay:
    """A relay on loopback in its own thread and event loop, for a synchronous HTTP client."""

    def __init__(self, data: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)
        self.thread.start()
        from aiohttp import web  # noqa: PLC0415

        # Rate limits out of the way: a fuzzer answered 429 half the time reaches no handler.
        # Long polls (GET /v1/inbox?wait=N on an empty inbox) held 50 ms, not up to a minute.
        self.app = create_app(RelayConfig(data=data, listen="127.0.0.1:0", purge_interval=3600.0,
                                          rate_limit=1e6, rate_burst=1_000_000, enroll_failures=1_000_000,
                                          max_inbox_wait=0.05))
        self.runner = web.AppRunner(self.app, handle_signals=False)
        self.run(self.runner.setup())
        self.run(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def enrol(self, rpps: str) -> DeviceKeys:
        keys = DeviceKeys.generate(now=int(time.time()))
        code = new_invitation_code()
        now = int(time.time())
        self.run(self.app[STORAGE].create_invitation(
            Practitioner(rpps=rpps, name="Dr Fuzz", profession="médecin", specialty=""), code,
            now=now, expires=now + 3600))
        r = requests.post(f"{self.url}/v1/enroll", data=_enrol_body(code, keys),
                          headers={"Content-Type": "application/msgpack"}, timeout=30)
        assert r.status_code == 201, r.text
        return keys


class Sign(requests.auth.AuthBase):
    """Signs the request exactly as sent (method, authority, raw path and query, body)."""

    def __init__(self, keys: DeviceKeys) -> None:
        self.keys = keys

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = r.body or b""
        if isinstance(body, str):
            body = body.encode()
        assert isinstance(body, bytes), type(body)
        u = urllib.parse.urlsplit(r.url or "")
        path, _, query = r.path_url.partition("?")
        r.headers.update(httpsig.sign_request(
            method=r.method or "GET",
            authority=httpsig.authority(u.hostname or "", u.port, u.scheme),
            path=path,
            query=query,
            content_digest=httpsig.content_digest(hashlib.sha256(body).digest()),
            signing_key=self.keys.signing_key,
            keyid=self.keys.device_id.hex(),
            created=int(time.time()),
            nonce=httpsig.encode_nonce(os.urandom(16)),
        ))
        return r


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A live relay with two devices and envelopes in each state, for the fuzzer to reach."""
    live = LiveRelay(tmp_path_factory.mktemp("fuzz-relay"))
    try:
        gp, derm = live.enrol(GP), live.enrol(DERM)
        now = int(time.time())
        session = requests.Session()

        def put(keys: DeviceKeys, eid: bytes, body: bytes) -> None:
            r = session.put(f"{live.url}/v1/envelopes/{eid.hex()}", data=body, auth=Sign(keys),
                            headers={"Content-Type": ENVELOPE_TYPE}, timeout=30)
            assert r.status_code in {200, 201}, r.text

        ct = os.urandom(2000)
        stored, stored_prefix = make_envelope(gp, [derm.device_id], ct, now=now, expires=now + 7200)
        put(gp, stored, stored_prefix + ct)
        partial, partial_prefix = make_envelope(gp, [derm.device_id], ct, now=now, expires=now + 7200)
        put(gp, partial, partial_prefix + ct[:500])
        answer, answer_prefix = make_envelope(derm, [gp.device_id], b"re", now=now, expires=now + 7200)
        put(derm, answer, answer_prefix + b"re")
        yield {
            "live": live, "session": session, "signers": [Sign(gp), Sign(derm)],
            "path": {"id": [stored.hex(), partial.hex(), answer.hex()], "rpps": [GP, DERM],
                     "device_id": [gp.device_id.hex(), derm.device_id.hex()]},
            "put_body": partial_prefix + ct[:700],
        }
        session.close()
    finally:
        live.close()


def _fuzz_schema() -> Any:
    import schemathesis  # noqa: PLC0415 - a test-only dependency, loaded by the fuzz tests alone

    # Envelope bodies are raw bytes, like application/octet-stream (registering twice is harmless).
    schemathesis.serializer.alias(ENVELOPE_TYPE, "application/octet-stream")

    @schemathesis.serializer("application/msgpack")
    def _msgpack(_ctx: Any, value: Any) -> bytes:
        # The device record's members are msgpack bin; the generated strings become bytes.
        if isinstance(value, dict) and isinstance(value.get("device"), dict):
            value = {**value, "device": {k: v.encode() if isinstance(v, str) else v
                                         for k, v in value["device"].items()}}
        try:
            return msgpack.packb(value, use_bin_type=True)
        except (OverflowError, TypeError, ValueError):  # e.g. an integer past 64 bits
            return repr(value).encode()  # still a body to refuse

    # Invalid data must be refused; any 4xx is a refusal (413 for an over-long field, 401 unsigned...).
    config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": ["4XX"]}}})
    return schemathesis.openapi.from_dict(document(), config=config)


_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


def _is_http(case: Any) -> bool:
    """Header values HTTP allows (RFC 9110 §5.5, without obs-text); anything else is refused by
    aiohttp's parser (400 text/plain) before the relay sees a request, so it is not the API's answer."""
    return all(_FIELD_VALUE.fullmatch(str(v)) for v in (case.headers or {}).values())


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_fuzz_finds_no_5xx_and_nothing_undocumented(world: dict[str, Any], signed: bool) -> None:
    from schemathesis.checks import not_a_server_error  # noqa: PLC0415
    from schemathesis.generation import GenerationMode  # noqa: PLC0415
    from schemathesis.specs.openapi.checks import (  # noqa: PLC0415
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_headers_conformance, response_schema_conformance, negative_data_rejection]
    schema = _fuzz_schema()
    live, session = world["live"], world["session"]
    failures: list[str] = []
    started = time.perf_counter()
    count = 0
    for result in schema.get_all_operations():
        op = result.ok()
        # Generated values, and the same operation on real ids (and a real body), so the
        # fuzz also reaches what lies behind "no such envelope".
        strategies = [op.as_strategy(generation_mode=m) for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        real = {name: world["path"][name] for name in re.findall(r"\{([^}]+)\}", op.path)}
        if real:
            strategies.append(st.fixed_dictionaries({k: st.sampled_from(v) for k, v in real.items()})
                              .flatmap(lambda fixed, op=op: op.as_strategy(path_parameters=fixed)))
        if op.method.upper() == "PUT":
            strategies.append(op.as_strategy(path_parameters={"id": world["path"]["id"][1]},
                                             body=world["put_body"], media_type=ENVELOPE_TYPE))
        signer = st.sampled_from(world["signers"]) if signed else st.none()

        @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(strategies).filter(_is_http), auth=signer)
        def run(case: Any, auth: Sign | None) -> None:
            nonlocal count
            count += 1
            if "Signature" not in (case.headers or {}):
                auth = None  # a negative case without credentials: send it so
            kwargs = {"auth": auth} if auth is not None else {}
            response = case.call(base_url=live.url, session=session, **kwargs)
            case.validate_response(response, checks=checks)
            if auth is None and case.operation.definition.raw.get("security") != []:
                assert response.status_code == 401, f"{case.method} {case.formatted_path}: {response.status_code}"

        try:
            run()
        except Exception as e:  # every operation's failure, reported together
            failures.append(f"{op.method.upper()} {op.path}: {e}")
    elapsed = time.perf_counter() - started
    print(f"fuzzed {count} requests in {elapsed:.1f}s ({'signed' if signed else 'unsigned'})")
    assert not failures, "\n\n".join(failures)
