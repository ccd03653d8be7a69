"""The HTTP API: thin handlers that parse, check limits, call the node, and answer JSON.

Every kind of bad input has its own status (400 malformed, 404 unknown, 405 method, 413 too large,
415 wrong content type, 429 ignored or over a limit, 503 overloaded) and a JSON body ``{"error": "..."}`` naming the problem.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import resource
import signal
import time
import weakref
from http import HTTPStatus

import msgpack
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from p2pml.gossip import MSGPACK, PEER_HEADER, PROOF_HEADER
from p2pml.ledger import Task
from p2pml.service import Node, Unavailable
from p2pml.wire import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    MSGPACK_ERRORS,
    WireError,
    unpack_batch,
)

log = logging.getLogger(__name__)

NODE = web.AppKey("node", Node)
GUARD = web.AppKey("guard", "ConnectionGuard")
SOCKETS = web.AppKey("sockets", weakref.WeakSet)  # peers' open push streams, closed at shutdown
MAX_PREDICT_BYTES = 16384  # a /predict body holds a row (64 numbers for digits); more is abuse
MAX_CONNECTIONS = 2048  # open connections in all: each costs a few tens of KiB
MAX_CONNECTIONS_PER_ADDRESS = 256  # so that one address cannot take them all
MAX_PREDICTS_PER_ADDRESS = 128  # /predict calls in progress from one address (429 beyond)
BODY_TIMEOUT_S = 5.0  # to send a request body: a client trickling bytes is cut (408)


class BadInput(ValueError):
    pass


NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE | re.ASCII)


def _number(name: str, value, text: bool, task: Task, categories: tuple[str, ...] = ()) -> float:
    if categories and isinstance(value, str) and value.strip() in categories:
        return float(categories.index(value.strip()))  # a category by name: its code
    if text and isinstance(value, str):
        if not NUMBER.fullmatch(value.strip()):
            named = f" or one of {', '.join(categories)}" if categories else ""
            raise BadInput(f"{name} must be a number{named}, got {value[:40]!r}")
        value = float(value.strip())
    elif type(value) not in (int, float):
        raise BadInput(f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        raise BadInput(f"{name} must be finite, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(value):
        raise BadInput(f"{name} must be finite, got {value}")
    lo, hi = task.feature_range
    if not lo <= value <= hi:
        unit = " (centimetres)" if task.name == "iris" else ""
        raise BadInput(f"{name} must be between {lo:g} and {hi:g}{unit}, got {value:g}")
    return value


def parse_features(fields: dict, source: str, text: bool, task: Task) -> tuple[float, ...]:
    """Either ``features`` (in the task's column order) or every feature by name. ``text``:
    values are query-string text (a JSON body must carry numbers, not strings)."""
    names = task.features
    categories = task.categories or ((),) * len(names)
    expected = f"expected 'features' or {', '.join(names)}"
    unknown = sorted(set(fields) - set(names) - {"features"})
    if unknown:
        raise BadInput(f"unknown {source} {unknown[0]!r}; {expected}")
    if "features" in fields:
        if set(fields) & set(names):
            raise BadInput(f"give either 'features' or the {len(names)} named features, not both")
        raw = fields["features"]
        if text and isinstance(raw, str):
            raw = raw.split(",") if raw.strip() else []
        if not isinstance(raw, list):
            raise BadInput(f"'features' must be a list of {len(names)} numbers: {', '.join(names)}")
        if len(raw) != len(names):
            got = f"{len(raw)} value" + ("" if len(raw) == 1 else "s")
            raise BadInput(f"'features' has {got}, but the model expects "
                           f"{len(names)}: {', '.join(names)}")
        return tuple(_number(f"feature {i + 1} ({n})", x, text, task, c)
                     for i, (x, n, c) in enumerate(zip(raw, names, categories)))
    missing = [n for n in names if n not in fields]
    if missing:
        raise BadInput(f"missing {source}(s): {', '.join(missing)}; {expected}")
    return tuple(_number(n, fields[n], text, task, c) for n, c in zip(names, categories))


def _fields(request: web.Request) -> dict:
    fields = {}
    for k, v in request.query.items():
        if k in fields:
            raise BadInput(f"parameter {k!r} is given more than once")
        fields[k] = v
    return fields


async def predict_get(request: web.Request) -> web.Response:
    task = request.app[NODE].task
    return await _predict(request, parse_features(_fields(request), "parameter", True, task))


def _no_duplicate_keys(pairs: list) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("a key appears more than once")
    return doc


async def predict_post(request: web.Request) -> web.Response:
    return await _predict(request, await _posted_row(request))


async def _posted_row(request: web.Request) -> tuple[float, ...]:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=f"POST {request.path} takes application/json, not {request.content_type!r}")
    if (request.content_length or 0) > MAX_PREDICT_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_PREDICT_BYTES, request.content_length)
    body = await _read(request)
    if len(body) > MAX_PREDICT_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_PREDICT_BYTES, len(body))
    try:
        doc = json.loads(body, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadInput("body is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadInput('body must be a JSON object like {"features": [5.1, 3.5, 1.4, 0.2]}')
    return parse_features(doc, "field", False, request.app[NODE].task)


async def model_predict_get(request: web.Request) -> web.Response:
    """This node's own model alone (the workshop's question 1): no round, no ledger change."""
    node = request.app[NODE]
    return _own_answer(node, parse_features(_fields(request), "parameter", True, node.task))


async def model_predict_post(request: web.Request) -> web.Response:
    return _own_answer(request.app[NODE], await _posted_row(request))


def _own_answer(node: Node, row: tuple[float, ...]) -> web.Response:
    try:
        answer = node.own_answer(row)
    except Unavailable as exc:
        raise web.HTTPServiceUnavailable(text=str(exc), headers={"Retry-After": "1"}) from None
    return web.json_response(answer)


async def _read(request: web.Request) -> bytes:
    try:
        return await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None


async def _predict(request: web.Request, row: tuple[float, ...]) -> web.Response:
    guard = request.app[GUARD]
    address = request.remote or "?"
    if guard.predicts.get(address, 0) >= MAX_PREDICTS_PER_ADDRESS:
        raise web.HTTPTooManyRequests(
            text=f"{MAX_PREDICTS_PER_ADDRESS} queries from {address} are already waiting for their answer",
            headers={"Retry-After": "1"})
    guard.predicts[address] = guard.predicts.get(address, 0) + 1
    try:
        result = await request.app[NODE].predict(row)
    except Unavailable as exc:
        raise web.HTTPServiceUnavailable(text=str(exc), headers={"Retry-After": "1"}) from None
    finally:
        guard.predicts[address] -= 1
        if not guard.predicts[address]:
            del guard.predicts[address]
    if result["prediction"] is None:
        raise web.HTTPServiceUnavailable(text="no vote arrived in time; retry",
                                         headers={"Retry-After": "1"})
    return web.json_response(result)


async def ledger(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].ledger_view())


async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if node.key_conflict:
        return web.json_response({"status": "key in use elsewhere", "error": node.key_conflict},
                                 status=503)
    if node.seat_conflict:
        return web.json_response({"status": "seat held by another key", "error": node.seat_conflict,
                                  "peer": node.id, "name": node.me.name}, status=503)
    backlog = node.data.backlog()
    if backlog:
        return web.json_response({"status": "cannot write its log", "error": backlog}, status=503)
    return web.json_response({"status": "ok", "ready": node.readiness.ready,
                              "ready_reason": node.readiness.reason, "peer": node.id, "name": node.me.name,
                              "model": node.me.model, "behavior": node.model.behavior,
                              "root": node.ledger.root(), "reachable": sorted(node.gossip.reachable()),
                              "intake": node.stats, "pushes": node.gossip.pushes,
                              "rebuilds": node.rebuilds, "unwritten_bytes": node.data.unwritten,
                              "outbox_dropped": {n: link.dropped for n, link in node.gossip.links.items()},
                              "scores": node.scores.view(),
                              "connections": request.app[GUARD].view()})


async def ready(request: web.Request) -> web.Response:
    """Readiness, for load balancers and scripts: 200 once queries get answers that count the
    peers' votes (see readiness.py), else 503 with Retry-After."""
    node = request.app[NODE]
    problem = node.key_conflict or node.seat_conflict or node.data.backlog() or (
        None if node.readiness.ready else f"not ready yet: {node.readiness.reason}")
    if problem:
        return web.json_response({"ready": False, "peer": node.id, "error": problem}, status=503,
                                 headers={"Retry-After": "1"})
    return web.json_response({"ready": True, "peer": node.id, "name": node.me.name,
                              "reason": node.readiness.reason,
                              "reachable": sorted(node.gossip.reachable())})


def _source(request: web.Request) -> str:
    """The scored source of a peer request; refused unread (429) while it is ignored."""
    node = request.app[NODE]
    source = node.source_of(request.headers.get(PEER_HEADER), request.headers.get(PROOF_HEADER),
                            request.remote)
    left = node.scores.ignored(source)
    if left:
        raise web.HTTPTooManyRequests(
            text=f"{source} is ignored for {left:.0f} s more: it sent {node.scores.limit} invalid "
                 f"messages", headers={"Retry-After": str(int(left) + 1)})
    if source.startswith("peer "):
        node.gossip.heard_from(source[len("peer "):])
    return source


async def _msgpack_body(request: web.Request) -> tuple[bytes, str]:
    source = _source(request)
    if request.content_type != MSGPACK:
        raise web.HTTPUnsupportedMediaType(text=f"{request.path} takes {MSGPACK}, not {request.content_type!r}")
    return await _read(request), source  # bounded by the app's client_max_size (413 beyond)


async def gossip(request: web.Request) -> web.Response:
    data, source = await _msgpack_body(request)
    try:
        envs = unpack_batch(data)
    except WireError as exc:
        request.app[NODE].scores.penalize(source)
        raise BadInput(str(exc)) from None
    result = await request.app[NODE].ingest(envs, source)
    if "unavailable" in result:
        raise web.HTTPServiceUnavailable(text=result["unavailable"], headers={"Retry-After": "1"})
    # A batch is judged message by message; only one with nothing usable at all is a 400.
    if envs and result["rejected"] == len(envs):
        return web.json_response({"error": f"every message was rejected: {result['errors'][0]}",
                                  **result}, status=400)
    return web.json_response(result)


async def gossip_ws(request: web.Request) -> web.WebSocketResponse:
    """A peer's push stream: each binary frame is one gossip batch, checked like POST /gossip,
    but neither answered nor waited on for its fsync (it is written in the background): the
    sender keeps its own copy, and what a crash loses here anti-entropy brings back."""
    node = request.app[NODE]
    source = _source(request)
    if not source.startswith("peer "):  # a stream is held open: only for peers that prove it
        raise web.HTTPForbidden(text="/gossip/ws is for peers: send X-P2PML-Peer and a valid "
                                     "X-P2PML-Proof (or use POST /gossip)")
    ws = web.WebSocketResponse(max_msg_size=MAX_BATCH_BYTES,
                               heartbeat=node.net.request_timeout_ms / 1000)  # a vanished peer is cut
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    async for msg in ws:
        if msg.type != WSMsgType.BINARY:
            await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"binary gossip batches only")
            break
        try:
            envs = unpack_batch(msg.data)
        except WireError as exc:
            log.debug("bad batch from %s: %s", source, exc)
            node.scores.penalize(source)
        else:
            await node.ingest(envs, source, acknowledge=False)
        if node.scores.ignored(source):
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too many invalid messages")
            break
    return ws


async def sync(request: web.Request) -> web.Response:
    data, _ = await _msgpack_body(request)
    node = request.app[NODE]
    try:
        theirs = msgpack.unpackb(data, max_array_len=256, max_map_len=0, max_str_len=0,
                                 max_bin_len=32, max_ext_len=0)
        answer = node.gossip.answer_sync(theirs)
    except MSGPACK_ERRORS as exc:
        raise BadInput(f"/sync takes a msgpack digest: {exc}") from None
    return web.Response(body=answer, content_type=MSGPACK)


async def fetch(request: web.Request) -> web.Response:
    data, _ = await _msgpack_body(request)
    try:
        ids = msgpack.unpackb(data, max_array_len=MAX_BATCH_MESSAGES, max_map_len=0,
                              max_str_len=0, max_bin_len=32, max_ext_len=0)
        # old envelopes are read back from the log: in a thread, not on the event loop
        answer = await asyncio.to_thread(request.app[NODE].gossip.answer_fetch, ids)
    except MSGPACK_ERRORS as exc:
        raise BadInput(f"/fetch takes a msgpack list of message ids: {exc}") from None
    return web.Response(body=answer, content_type=MSGPACK)


def _hex_id(request: web.Request, size: int, problem: str) -> bytes:
    """The ``{id}`` of the path: ``size`` bytes in hex, else a 400 saying ``problem``."""
    try:
        key = bytes.fromhex(request.match_info["id"])
    except ValueError:
        key = b""
    if len(key) != size:
        raise BadInput(problem)
    return key


def _lookup(request: web.Request, what: str, size: int, find) -> web.Response:
    """``GET /{what}/{id}``: the id is ``size`` bytes in hex; 404 if ``find`` knows nothing of it."""
    text = request.match_info["id"]
    key = _hex_id(request, size, f"a {what} id is {2 * size} hex digits")
    found = find(key)
    if found is None:
        raise web.HTTPNotFound(text=f"no {what} {text}")
    return web.json_response(found)


async def message(request: web.Request) -> web.Response:
    return _lookup(request, "message", 32, request.app[NODE].message)


async def round_(request: web.Request) -> web.Response:
    return _lookup(request, "round", 16, request.app[NODE].round_view)


async def account(request: web.Request) -> web.Response:
    """Any key has an account (most hold nothing): 400 only for what is not a key."""
    key = _hex_id(request, 32, "an account is an Ed25519 public key: 64 hex digits")
    return web.json_response(request.app[NODE].account_view(key))


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error leaves as JSON naming the problem; nothing a client sends can cause a 500.
    (Also tells the connection guard that its connection is serving a request.)"""
    guard = request.app.get(GUARD)
    conn = guard.busy(request.transport) if guard else None
    try:
        return await handler(request)
    except BadInput as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return web.json_response({"error": text}, status=exc.status, headers={
            k: v for k, v in exc.headers.items() if k in ("Retry-After", "Allow")})
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response({"error": "internal error"}, status=500)
    finally:
        if conn is not None:
            guard.done(conn)


def make_app(node: Node) -> web.Application:
    app = web.Application(client_max_size=MAX_BATCH_BYTES, middlewares=[json_errors])
    app[NODE] = node
    app[GUARD] = ConnectionGuard(node.net.idle_timeout_ms / 1000)
    app[SOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(_close_sockets)

    app.router.add_get("/predict", predict_get, allow_head=False)  # a HEAD must cause no work: 405
    app.router.add_post("/predict", predict_post)
    app.router.add_get("/model/predict", model_predict_get, allow_head=False)
    app.router.add_post("/model/predict", model_predict_post)
    app.router.add_get("/ledger", ledger)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_post("/gossip", gossip)
    app.router.add_get("/gossip/ws", gossip_ws)
    app.router.add_post("/sync", sync)
    app.router.add_post("/fetch", fetch)
    app.router.add_get("/message/{id}", message)
    app.router.add_get("/round/{id}", round_)
    app.router.add_get("/account/{id}", account)
    return app


async def _close_sockets(app: web.Application) -> None:
    """A peer's push stream never ends by itself: at shutdown it is closed (going away), else
    the server would wait out its shutdown timeout for it while that peer stops too."""
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"stopping")
                           for ws in list(app[SOCKETS])), return_exceptions=True)


# -- connections ------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("address", "busy", "since", "transport")

    def __init__(self, address: str, transport):
        self.address, self.transport = address, transport
        self.busy, self.since = 0, time.monotonic()


class _JsonErrors(RequestHandler):
    """aiohttp answers a request its parser refuses (a 20 KB URL or header: 400) before any
    middleware sees it, in text/plain; this answers those in JSON too, logged at debug level
    only (the client's fault, and cheap to provoke)."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            log.error("error handling %s %s", request.method, request.path, exc_info=exc)
            text = "internal error" if status == 500 else HTTPStatus(status).phrase.lower()
        else:
            log.debug("refused a malformed request from %s: %s", request.remote, message or exc)
            if isinstance(exc, LineTooLong):
                text = (f"the request line or a header is longer than {exc.args[1]} bytes "
                        f"(a /predict query needs a few dozen)")
            else:
                text = f"malformed HTTP request: {(message or HTTPStatus(status).phrase)[:200]}"
        if request.writer.output_size > 0:  # part of an answer left: the connection is broken
            raise ConnectionError("an answer was being sent; cannot send an error instead")
        resp = web.json_response({"error": text}, status=status)
        resp.force_close()
        return resp


class ConnectionGuard:
    """Bounds what connections can cost, below aiohttp (which has no limit on connections and
    no deadline for a request's headers): at most MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS
    from one address (more are closed at once), and a connection that is not serving a
    request (idle, or trickling a request's headers) is closed after ``idle_s``. A request
    body has BODY_TIMEOUT_S; a request being served (a /predict waiting for votes, a peer's
    WebSocket) is never cut."""

    def __init__(self, idle_s: float):
        self.idle_s = idle_s
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)  # and never beyond the fds we have
        self.max_connections = max(16, min(MAX_CONNECTIONS, soft - 128))
        self._conns: dict[object, _Conn] = {}  # transport -> connection
        self._per_address: dict[str, int] = {}
        self.predicts: dict[str, int] = {}
        self.refused = self.closed_idle = 0

    def wrap(self, factory):
        guard = self

        class Guarded(asyncio.Protocol):
            """Forwards everything to aiohttp's protocol; counts the connection."""

            def __init__(self):
                self.inner = factory()
                # the same handler, built as aiohttp builds it, answering its own errors in JSON
                if type(self.inner) is RequestHandler:
                    self.inner.__class__ = _JsonErrors
                self.conn: _Conn | None = None

            def connection_made(self, transport):
                peer = transport.get_extra_info("peername")
                address = peer[0] if peer else "?"
                if len(guard._conns) >= guard.max_connections or \
                        guard._per_address.get(address, 0) >= MAX_CONNECTIONS_PER_ADDRESS:
                    guard.refused += 1
                    transport.abort()
                    return
                self.conn = _Conn(address, transport)
                guard._conns[transport] = self.conn
                guard._per_address[address] = guard._per_address.get(address, 0) + 1
                self.inner.connection_made(transport)

            def connection_lost(self, exc):
                if self.conn is None:
                    return
                guard._conns.pop(self.conn.transport, None)
                left = guard._per_address[self.conn.address] - 1
                if left:
                    guard._per_address[self.conn.address] = left
                else:
                    del guard._per_address[self.conn.address]
                self.inner.connection_lost(exc)

            def data_received(self, data):
                if self.conn is not None:
                    self.inner.data_received(data)

            def eof_received(self):
                return self.inner.eof_received() if self.conn is not None else None

            def pause_writing(self):
                self.inner.pause_writing()

            def resume_writing(self):
                self.inner.resume_writing()

        return Guarded

    def busy(self, transport) -> _Conn | None:
        conn = self._conns.get(transport)
        if conn is not None:
            conn.busy += 1
        return conn

    def done(self, conn: _Conn) -> None:
        conn.busy -= 1
        conn.since = time.monotonic()

    def sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if not conn.busy and now - conn.since > self.idle_s:
                if conn.transport.is_closing():  # closed before, but its answer is not read
                    conn.transport.abort()
                    continue
                self.closed_idle += 1
                conn.transport.close()

    def view(self) -> dict:
        return {"open": len(self._conns), "addresses": len(self._per_address),
                "refused": self.refused, "closed_idle": self.closed_idle}


async def serve(node: Node, host: str, port: int) -> None:
    """Run the API until SIGINT, SIGTERM or SIGHUP (each a clean stop), behind the connection
    guard."""
    app = make_app(node)
    guard = app[GUARD]
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=guard.idle_s,
                           handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopped_by: list[str] = []
    stops = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # its terminal closed; not under nohup
        stops.append(signal.SIGHUP)
    for sig in stops:
        loop.add_signal_handler(sig, lambda sig=sig: (stopped_by.append(sig.name), stop.set()))
    try:
        server = await loop.create_server(guard.wrap(runner.server), host, port, reuse_address=True)
    except OSError:
        await runner.cleanup()
        raise
    log.info("listening on http://%s:%d", host, port)
    sweeper = asyncio.create_task(_sweep(guard))
    # Live before ready: the start-up sync runs while the node listens (/health answers, /ready
    # and /predict say 503), so a peer that hears from us during it can answer back at once.
    try:
        await node.start()
    except BaseException:
        sweeper.cancel()
        server.close()
        await runner.cleanup()
        raise
    try:
        await stop.wait()
        log.info("stopping on %s: finishing what is in flight", stopped_by[0])
    finally:
        sweeper.cancel()
        server.close()
        await runner.cleanup()
        await node.close()
    log.info("stopped cleanly; ledger root %s", node.ledger.root()[:16])


async def _sweep(guard: ConnectionGuard) -> None:
    while True:
        await asyncio.sleep(min(1.0, guard.idle_s / 4))
        guard.sweep()
