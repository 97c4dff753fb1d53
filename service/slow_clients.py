"""Slow clients, cut off by ``ssd serve`` itself (shared/design.md, "HTTP API"; a proxy in front
is welcome, not required). Three clocks, each kept where it can be enforced with the least
knowledge of uvicorn's internals:

- **Headers** (``guarded_protocol``: a subclass of uvicorn's HTTP protocol class, httptools' or
  h11's, before any ASGI code runs). A timer starts when the connection is made, and again at
  the first byte of each next request on a kept-alive connection; the request's headers must be
  complete within ``SSD_HEADER_TIMEOUT_S``, and the bytes received until then may not pass
  ``SSD_MAX_HEADER_BYTES``, else the connection gets a minimal ``408`` (``request_timeout``) or
  ``431`` (``request_header_fields_too_large``) with ``Connection: close`` and is closed (after a
  short lingering close, so that late bytes from the client do not turn the close into a reset
  that could discard the answer). uvicorn has neither clock: its keep-alive timer only runs
  between a response and the next request's first byte, and httptools has no header limit.
- **Body** (``BodyRateGuard``, ASGI middleware): from the first ``receive()`` the body must have
  arrived within ``SSD_BODY_TIMEOUT_S`` plus one second per ``SSD_MIN_BODY_RATE`` bytes received
  (mod_reqtimeout's rule); each ``receive()`` waits at most what is left of that allowance. When it
  runs out the guard answers ``408`` with ``Connection: close`` itself (uvicorn closes the
  connection after it), hands the app ``http.disconnect`` so that it stops, and drops whatever the
  app sends afterwards (its 499).
- **Idle keep-alive**: uvicorn's own ``timeout_keep_alive``, set to ``SSD_KEEPALIVE_TIMEOUT_S`` by
  service/server.py.

How the protocol knows where a request stands, with nothing but the protocol's public surface
(``data_received``, ``connection_made``, ``connection_lost``, its ``transport``) and three
attributes both of uvicorn's implementations share (each pinned by tests/test_slow_clients.py,
which runs every case on both, so that an upgrade that changes them fails a test):

- ``self.cycle``: the current request's ``RequestResponseCycle``, None before the first. uvicorn
  makes a new one the moment a request's headers are complete, inside the parser callback that
  ``data_received`` drives: a changed identity after ``super().data_received`` is "headers
  complete", whatever the parser. (h11 parses a pipelined request only once the response before it
  is done, outside ``data_received``; the timer then sees the change when it fires.)
- ``cycle.more_body`` (False once the request's body has all arrived) and
  ``cycle.response_complete``: between them they tell whether new bytes can be the current
  request's body (left to the body guard) or must be the next request.

A chunk is fed to the parser only up to the header byte budget: if the headers are not complete
by then, they are too large, however the chunk was cut; unless the parser has stopped reading
(``transport.is_reading()`` False: uvicorn pauses reading while h11 holds a pipelined request until
the response before it is done), when it gets the rest of the chunk, and nothing more comes.

Beyond the contract's cases: bytes that arrive after a request was answered before its body was
read (an early 413 on a kept-alive connection) are the rest of that body, which no one reads; they
run on the header clock and budget, and when either runs out the connection is closed without a
second answer (the client has its answer and is not reading). A response in progress is never cut
by a next (pipelined) request's header clock: the cut waits for that response. The start of a
next request that comes in the same packet as the end of the one before reaches the parser before
its clock can start: uvicorn's keep-alive timer (armed after the response, cancelled by the next
byte, which starts the clock) bounds it instead, closing without a 408.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .settings import Settings

log = logging.getLogger(__name__)

# After an answer and a FIN, how long the client's late bytes are read and dropped before the close
# (Apache's lingering close): closing a socket with unread input sends a reset, and a reset can
# reach the client before it has read the answer.
LINGER_S = 2.0
# A next request's header clock that runs out while the response before it is still being sent
# checks back this often (so that the cut comes at most this late after that response).
RECHECK_S = 0.5

# Where a connection stands, from uvicorn's cycle (see the module docstring).
_IDLE = "idle"  # no request yet, or the last one answered and its body all read: bytes start a request
_BODY = "body"  # the current request's body is arriving: the body guard's business
_PIPELINED = "pipelined"  # body all read, response in progress: bytes start a next request
_DRAIN = "drain"  # answered before its body was read: bytes are that body, then maybe a next request


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def raw_response(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response with a JSON error and ``Connection: close``."""
    body = error_body(code, message)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def default_protocol() -> type[asyncio.Protocol]:
    """The class uvicorn's ``http="auto"`` chooses: httptools' when it imports, else h11's."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return AutoHTTPProtocol


def guarded_protocol(
    base: type[asyncio.Protocol],
    settings: Settings,
    on_cut: Callable[[str], None] | None = None,
) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's HttpToolsProtocol or H11Protocol) with the header clock and budget;
    ``on_cut(reason)`` is told of each cut, reason ``header_timeout`` or ``header_too_large``."""
    timeout_s = settings.header_timeout_s
    limit = settings.max_header_bytes

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        # Class-level defaults: uvicorn's constructor stays untouched.
        _guard_timer: asyncio.TimerHandle | None = None
        _guard_pending = False  # a request's headers are awaited
        _guard_cycle: object = None  # uvicorn's cycle when the clock started
        _guard_bytes = 0  # received since the clock started
        _guard_closed = False  # cut: whatever still arrives is dropped

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._guard_start()

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard_stop()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._guard_closed:
                return
            if self._guard_pending and self.cycle is not self._guard_cycle:
                self._guard_stop()  # h11 completed a pipelined request's headers after the fact
            while data:
                if not self._guard_pending:
                    if self._phase() == _BODY:
                        super().data_received(data)
                        return
                    self._guard_start()  # the first byte of a next request
                room = max(limit - self._guard_bytes, 0)
                head, data = data[:room], data[room:]
                self._guard_bytes += len(head)
                if head:
                    super().data_received(head)
                if self.transport.is_closing():  # uvicorn answered (a 400) and closes
                    self._guard_stop()
                    return
                if self.transport.get_protocol() is not self:  # upgraded (WebSocket): not ours any more
                    self._guard_stop()
                    if data:
                        self.transport.get_protocol().data_received(data)  # type: ignore[attr-defined]
                    return
                if self.cycle is not self._guard_cycle:
                    self._guard_stop()  # headers complete; the rest of the chunk goes round again
                elif data and not self.transport.is_reading():
                    # The parser stopped reading: it keeps a pipelined request until the response
                    # before it is done (h11 does; httptools parses it at once), at most this chunk.
                    super().data_received(data)
                    return
                elif data:
                    self._guard_cut("header_too_large")
                    return

        def _phase(self) -> str:
            cycle = self.cycle
            if cycle is None:
                return _IDLE
            if cycle.response_complete:
                return _DRAIN if cycle.more_body else _IDLE
            return _BODY if cycle.more_body else _PIPELINED

        def _guard_start(self) -> None:
            self._guard_stop()
            self._guard_pending = True
            self._guard_cycle = self.cycle
            self._guard_bytes = 0
            self._guard_timer = asyncio.get_running_loop().call_later(timeout_s, self._guard_expired)

        def _guard_stop(self) -> None:
            self._guard_pending = False
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None

        def _guard_expired(self) -> None:
            self._guard_timer = None
            if not self._guard_pending or self.transport.is_closing():
                return
            if self.cycle is not self._guard_cycle:
                self._guard_stop()
                return
            if self._phase() == _PIPELINED:
                # Cutting now would cut the answer to the request before, which is not late.
                self._guard_timer = asyncio.get_running_loop().call_later(RECHECK_S, self._guard_expired)
                return
            self._guard_cut("header_timeout")

        def _guard_cut(self, reason: str) -> None:
            answer = self._phase() == _IDLE  # else a response is in progress, or was given
            self._guard_stop()
            self._guard_closed = True
            if on_cut is not None:  # before the answer: a client that has it finds it counted
                try:
                    on_cut(reason)
                except Exception:  # counting must never break the connection handling
                    log.exception("on_cut(%r) failed", reason)
            transport = self.transport
            if answer:
                if reason == "header_timeout":
                    status, code = 408, "request_timeout"
                    message = f"the request's headers did not arrive within {timeout_s:g} s"
                else:
                    status, code = 431, "request_header_fields_too_large"
                    message = f"the request line and headers pass {limit} bytes"
                transport.write(raw_response(status, code, message))
            if answer and transport.can_write_eof():
                transport.write_eof()
                asyncio.get_running_loop().call_later(LINGER_S, transport.close)
            else:
                transport.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def _count(scope: Scope, reason: str) -> None:
    """``detector_rejected_requests_total{reason}`` of the app serving ``scope``, once it runs."""
    state = getattr(getattr(scope.get("app"), "state", None), "service", None)
    metrics = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.rejected.labels(reason).inc()


class BodyRateGuard:
    """ASGI middleware: a request body must arrive within ``timeout_s + received / min_rate``
    seconds of the app's first ``receive()``, else 408 and the connection closed."""

    def __init__(self, app: ASGIApp, timeout_s: float, min_rate: int) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        origin: float | None = None
        received = 0
        body_done = False
        response_started = False
        answered = False  # the guard sent the 408; the app's own answer is dropped
        cut = False  # the allowance ran out: the app is told the client is gone

        async def guarded_receive() -> Message:
            nonlocal origin, received, body_done, answered, cut
            if cut:
                return {"type": "http.disconnect"}
            if body_done:
                # The app may wait for a disconnect after the body (detect.py does): no clock then.
                return await receive()
            if origin is None:
                origin = loop.time()
            deadline = origin + self.timeout_s + received / self.min_rate
            try:
                # asyncio.timeout, not wait_for: no task per chunk, and a message already there at
                # the deadline is taken (receive() then returns without suspending). uvicorn's
                # receive() is cancellation-safe: cancelled while it waits, it has taken nothing.
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                cut = True
                _count(scope, "body_timeout")
                if response_started:
                    # Too late for a 408: the app ends its response as it can; what still comes
                    # of the body then runs on the protocol's header clock and budget (a drain).
                    log.warning("request body too slow after the response started; dropping it")
                else:
                    answered = True
                    await self._answer(send)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if answered:
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ClientDisconnect:
            if not cut:
                raise  # a client that really left: the app's handlers decide

    async def _answer(self, send: Send) -> None:
        body = error_body(
            "request_timeout",
            f"the request body arrived slower than {self.min_rate} bytes/s "
            f"(after an allowance of {self.timeout_s:g} s); the connection is closed",
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # uvicorn closes the connection after a response with it (httptools and h11 alike).
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 408, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
