"""Slow clients, cut off by ``ssd serve`` itself (README, "Serve"; a proxy in front
is welcome, not required). Three clocks, each kept where it can be enforced with the least
knowledge of uvicorn's internals, and what a connection does with a body that comes after its
request was answered:

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
  runs out the guard answers ``408`` with ``Connection: close`` itself (uvicorn then closes the
  connection, with the lingering close below), hands the app ``http.disconnect`` so that it
  stops, and drops whatever the app sends afterwards (its 499).
- **Idle keep-alive**: uvicorn's own ``timeout_keep_alive``, set to ``SSD_KEEPALIVE_TIMEOUT_S`` by
  service/server.py (after a drained body, the protocol's own timer of the same length: uvicorn's
  went with the drain's first byte).
- **After an early answer** (the protocol). A request may be answered before its body was read:
  the service's ``413`` of a declared size past its limit, its ``503`` refusals, the body guard's
  ``408``. Most clients (Python's ``http.client``, many SDKs) send their whole body before they
  read: they see the answer only if the server goes on reading that body, since closing a socket
  with unread input sends a reset, which reaches a client still writing before it reads (nginx's
  and Apache's lingering close). So:

  - On a connection that stays open (the **drain**), the bytes are the rest of that body: they go
    to uvicorn's parser, which drops the body of a request whose response is complete (httptools'
    ``on_body`` and ``on_message_complete`` return early, h11's ``Data`` is skipped once our side
    is ``DONE``), and once the body ends the connection goes on: the next request is answered,
    with the header clock on its headers.
  - When uvicorn closes the connection (an answer with ``Connection: close``) while the body is
    still coming, the close is a **lingering close**: uvicorn's transport is a thin wrapper
    (``_GuardedTransport``) whose ``close()`` half-closes (the answer goes out, then a FIN), reads
    and drops what still comes, then closes. A client that closes first ends it at once (its FIN
    closes the transport); ``connection_lost`` cancels every timer.

  Both are bounded alike: at most ``drain_limit(settings)`` bytes (the largest body the service
  reads: a refusal of any body it could have read gets through), within the body rule of
  ``BodyRateGuard`` counted from the first dropped byte (``SSD_BODY_TIMEOUT_S`` plus one second
  per ``SSD_MIN_BODY_RATE`` bytes dropped), with at most ``LINGER_S`` between two reads (a client
  that has stopped sending is not waited for). Past a bound the connection is closed, a reset if
  bytes are still unread: the accepted cost for a client that is too slow, or sends too much.
  That close is logged, not counted in ``detector_rejected_requests_total``: the request was
  answered, and counted, already (as ``payload_too_large``, its 503's reason, ``body_timeout``).

How the protocol knows where a request stands, with nothing but the protocol's public surface
(``data_received``, ``connection_made``, ``connection_lost``, its ``transport``), three attributes
both of uvicorn's implementations share, and where each parser tells that a request's body is over
(each pinned by tests/test_slow_clients.py, which runs every case on both, so that an upgrade that
changes them fails a test):

- ``self.cycle``: the current request's ``RequestResponseCycle``, None before the first. uvicorn
  makes a new one the moment a request's headers are complete, inside the parser callback that
  ``data_received`` drives: a changed identity after ``super().data_received`` is "headers
  complete", whatever the parser. (h11 parses a pipelined request only once the response before it
  is done, outside ``data_received``; the timer then sees the change when it fires.)
- ``cycle.more_body`` (False once the request's body has all arrived) and
  ``cycle.response_complete``: between them they tell whether new bytes can be the current
  request's body (left to the body guard), must be the next request, or are the rest of a body
  already answered (the drain).
- The end of a body uvicorn drops, which leaves ``cycle.more_body`` True: httptools calls the
  protocol's ``on_message_complete`` (overridden here to note it), and h11 leaves ``SEND_BODY``
  (``self.conn.their_state``), starting its next cycle.
- ``self.transport``: uvicorn and its cycles reach the socket only through it, which is how the
  wrapper given to ``super().connection_made`` sees every close.

A chunk is fed to the parser only up to the header byte budget: if the headers are not complete
by then, they are too large, however the chunk was cut; unless the parser has stopped reading
(``transport.is_reading()`` False: uvicorn pauses reading while h11 holds a pipelined request until
the response before it is done), when it gets the rest of the chunk, and nothing more comes. A
drained body is fed in pieces of the header budget too, checking after each whether it ended: the
next request's first bytes in the piece that ends the body reach the parser before its clock
starts (at most one budget uncounted), the rest of the chunk runs on the clock.

Beyond the contract's cases: a response in progress is never cut by a next (pipelined) request's
header clock: the cut waits for that response. The start of a next request that comes in the same
packet as the end of the one before reaches the parser before its clock can start: uvicorn's
keep-alive timer (armed after the response, cancelled by the next byte, which starts the clock),
or the protocol's after a drained body, bounds it instead, closing without a 408.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, error_body
from .settings import Settings

log = logging.getLogger(__name__)

# After an answer and a FIN, how long the client's late bytes are read and dropped before the close
# (Apache's lingering close): closing a socket with unread input sends a reset, and a reset can
# reach the client before it has read the answer. Also the longest wait between two reads of a
# drained body (the drain, the lingering close while a body comes): Apache's figure, the
# client is sending flat out by then, or not any more.
LINGER_S = 2.0
# A next request's header clock that runs out while the response before it is still being sent
# checks back this often (so that the cut comes at most this late after that response).
RECHECK_S = 0.5

# Where a connection stands, from uvicorn's cycle (see the module docstring).
_IDLE = "idle"  # no request yet, or the last one answered and its body all read: bytes start a request
_BODY = "body"  # the current request's body is arriving: the body guard's business
_PIPELINED = "pipelined"  # body all read, response in progress: bytes start a next request
_DRAIN = "drain"  # answered before its body was all read: bytes are that body (dropped), then the next


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


def drain_limit(settings: Settings) -> int:
    """The most bytes of an answered request's body that a connection reads and drops (the drain,
    the lingering close) before it is closed: the largest body the service reads for any request
    (``SSD_MAX_REQUEST_BYTES``, 413 past it; with settings that do not have it, the largest
    multipart body, ``max_images_per_request`` images of ``max_image_bytes``), plus one image of
    ``max_image_bytes`` more, for multipart framing and for a body refused for passing a limit by
    less than that (the 21 MB image past a 20 MiB limit). A refusal of such a body (a 503, a 413)
    thus reaches a client that sends its whole body before it reads; a larger body is hostile or a
    mistake, and costs only bandwidth up to this bound (memory stays flat: the bytes are dropped as
    they come, one socket read at a time)."""
    largest = getattr(settings, "max_request_bytes", None)
    if not isinstance(largest, int):
        largest = settings.max_image_bytes * settings.max_images_per_request
    return largest + settings.max_image_bytes


class _GuardedTransport:
    """The transport uvicorn (and an upgraded protocol) is given: the real one, except that
    ``close()`` is the guard's to carry out (at once, or after a lingering close), ``is_closing()``
    is True from that call on, and what is written after it is dropped (the write side may already
    be shut). Everything else is the real transport's (the methods uvicorn calls bound once, any
    other through ``__getattr__``). A cycle gets it only while its request's body is arriving
    (``_guard_wrap``)."""

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]) -> None:
        self._transport = transport
        self._close = close
        self.closing = False
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.is_reading = transport.is_reading
        self.set_protocol = transport.set_protocol
        self.get_protocol = transport.get_protocol
        self._write = transport.write

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self._close()

    def is_closing(self) -> bool:
        return self.closing or self._transport.is_closing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self._write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        if not self.closing:
            self._transport.writelines(list_of_data)


def guarded_protocol(
    base: type[asyncio.Protocol],
    settings: Settings,
    on_cut: Callable[[str], None] | None = None,
    drain_bytes: int | None = None,
) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's HttpToolsProtocol or H11Protocol) with the header clock and budget, the
    drain of a body after an early answer and the lingering close (see the module docstring);
    ``on_cut(reason)`` is told of each cut, reason ``header_timeout`` or ``header_too_large``;
    ``drain_bytes`` bounds the drain (default ``drain_limit(settings)``)."""
    timeout_s = settings.header_timeout_s
    limit = settings.max_header_bytes
    drain_max = drain_limit(settings) if drain_bytes is None else drain_bytes
    body_timeout_s = settings.body_timeout_s
    min_rate = settings.min_body_rate
    idle_s = settings.keepalive_timeout_s
    # h11 has no parser callback for the end of a body it drops: its own state tells (pinned by
    # tests/test_slow_clients.py, as the rest).
    from uvicorn.protocols.http.h11_impl import H11Protocol

    h11_send_body = None
    if issubclass(base, H11Protocol):
        import h11

        h11_send_body = h11.SEND_BODY

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        # Class-level defaults: uvicorn's constructor stays untouched.
        _guard_timer: asyncio.TimerHandle | None = None
        _guard_pending = False  # a request's headers are awaited
        _guard_cycle: object = None  # uvicorn's cycle when the clock started
        _guard_bytes = 0  # received since the clock started
        _guard_real: asyncio.Transport  # the socket's transport, uvicorn's protocol's own
        _guard_transport: _GuardedTransport
        _guard_lost = False  # connection_lost has run
        _guard_ended: object = None  # the cycle whose request the parser saw end (httptools)
        # The drain (or the lingering close): bytes of an answered request's body, dropped.
        _lingering = False  # closing: whatever arrives is dropped, not parsed
        _drain_cycle: object = None  # the cycle whose body is drained
        _drain_origin = 0.0  # when the drain started
        _drain_last = 0.0  # when its last bytes came
        _drain_bytes = 0  # dropped so far
        _drain_until: float | None = None  # a fixed end (the lingering close after a cut)
        _drain_timer: asyncio.TimerHandle | None = None
        _idle_timer: asyncio.TimerHandle | None = None  # keep-alive after a drained body

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._guard_real = transport  # type: ignore[assignment]
            self._guard_transport = _GuardedTransport(transport, self._guard_close)  # type: ignore[arg-type]
            super().connection_made(transport)
            self._guard_start()

        def connection_lost(self, exc: Exception | None) -> None:
            self._guard_lost = True
            self._guard_stop()
            self._drain_stop()
            self._idle_stop()
            super().connection_lost(exc)

        if hasattr(base, "on_message_complete"):  # httptools' parser callback (h11 has none)

            def on_message_complete(self) -> None:
                # uvicorn ignores the end of a body whose response is complete (cycle.more_body
                # stays True): this is where the drain learns that the body is over.
                self._guard_ended = self.cycle
                self._guard_unwrap(self.cycle)
                super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                self._linger_received(len(data))
                return
            self._idle_stop()
            if self._guard_pending and self.cycle is not self._guard_cycle:
                self._guard_stop()  # h11 completed a pipelined request's headers after the fact
            while data:
                if self._lingering:  # uvicorn closed the connection in the middle of the chunk
                    self._linger_received(len(data))
                    return
                if not self._guard_pending:
                    phase = self._phase()
                    if phase == _BODY:
                        super().data_received(data)
                        if h11_send_body is not None and not self._body_pending(self.cycle):
                            self._guard_unwrap(self.cycle)
                        return
                    if phase == _DRAIN:
                        data = self._drain(data)  # what follows the end of that body goes round
                        continue
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
                    self._guard_wrap(self.cycle)
                elif data and not self.transport.is_reading():
                    # The parser stopped reading: it keeps a pipelined request until the response
                    # before it is done (h11 does; httptools parses it at once), at most this chunk.
                    super().data_received(data)
                    return
                elif data:
                    self._guard_cut("header_too_large")
                    return

        def _guard_wrap(self, cycle: object) -> None:
            """While a request's body is still arriving, its cycle (which answers it, and closes
            the connection after an answer with ``Connection: close``) writes and closes through
            the guard's transport: an answer given before the body is in gets a lingering close.
            Only then: every other answer is written straight to the socket, with no Python layer
            between uvicorn and its transport."""
            if cycle is not None and self._body_pending(cycle):
                cycle.transport = self._guard_transport  # type: ignore[attr-defined]

        def _guard_unwrap(self, cycle: object) -> None:
            """The body is all in: the cycle answers through the socket's transport itself."""
            if cycle is not None and getattr(cycle, "transport", None) is self._guard_transport:
                cycle.transport = self._guard_real  # type: ignore[attr-defined]

        def _body_pending(self, cycle: object) -> bool:
            """Whether bytes of ``cycle``'s request body are still to come."""
            if not cycle.more_body or cycle is self._guard_ended:  # type: ignore[attr-defined]
                return False
            if h11_send_body is not None:  # h11 starts its next cycle when a dropped body ends
                return self.conn.their_state is h11_send_body  # type: ignore[attr-defined]
            return True

        def _phase(self) -> str:
            cycle = self.cycle
            if cycle is None:
                return _IDLE
            pending = self._body_pending(cycle)
            if cycle.response_complete:
                return _DRAIN if pending else _IDLE
            return _BODY if pending else _PIPELINED

        # --- the header clock ---------------------------------------------------------------

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
            if on_cut is not None:  # before the answer: a client that has it finds it counted
                try:
                    on_cut(reason)
                except Exception:  # counting must never break the connection handling
                    log.exception("on_cut(%r) failed", reason)
            if not answer:
                self._guard_finish()
                return
            if reason == "header_timeout":
                status, code = 408, "request_timeout"
                message = f"the request's headers did not arrive within {timeout_s:g} s"
            else:
                status, code = 431, "request_header_fields_too_large"
                message = f"the request line and headers pass {limit} bytes"
            self._guard_real.write(raw_response(status, code, message))
            self._guard_linger(until=asyncio.get_running_loop().time() + LINGER_S)

        # --- the drain: the rest of an answered request's body, on a connection kept open ----

        def _drain(self, data: bytes) -> bytes:
            """Feeds ``data`` to the parser (which drops a body whose response is complete) until
            that body ends, within the drain's bounds; returns what follows the body's end."""
            cycle = self.cycle
            now = asyncio.get_running_loop().time()
            if self._drain_cycle is not cycle:
                self._drain_begin(cycle, now)
            self._drain_last = now
            while data:
                room = drain_max - self._drain_bytes
                if room <= 0:
                    log.info("closing a connection: the answered request's body passes %d bytes", drain_max)
                    self._guard_finish()
                    return b""
                # At most a header budget at a time: what follows the end of the body in the same
                # piece (a next request's first bytes) reaches the parser before the header clock.
                size = min(room, limit)
                piece, data = data[:size], data[size:]
                self._drain_bytes += len(piece)
                super().data_received(piece)
                if self.transport.is_closing():  # uvicorn closes (a 400 on broken chunks)
                    return data
                if self.cycle is not cycle or not self._body_pending(cycle):
                    self._drain_stop()  # the body is over: the connection goes on
                    if not data and self.cycle is cycle:
                        # uvicorn's keep-alive timer went with the drain's first byte; this is it.
                        self._idle_timer = asyncio.get_running_loop().call_later(idle_s, self._idle_expired)
                    return data
            return b""

        def _drain_begin(self, cycle: object, now: float) -> None:
            self._drain_cycle = cycle
            self._drain_origin = self._drain_last = now
            self._drain_bytes = 0
            self._drain_until = None
            self._drain_arm()

        def _drain_due(self) -> float:
            """When the drain ends unless more comes: ``LINGER_S`` after its last bytes, and no later
            than its fixed end, or else the body rule (``SSD_BODY_TIMEOUT_S`` from its start plus
            one second per ``SSD_MIN_BODY_RATE`` bytes dropped, as BodyRateGuard's)."""
            due = self._drain_last + LINGER_S
            if self._drain_until is not None:
                return min(due, self._drain_until)
            return min(due, self._drain_origin + body_timeout_s + self._drain_bytes / min_rate)

        def _drain_arm(self) -> None:
            self._drain_stop()
            loop = asyncio.get_running_loop()
            self._drain_timer = loop.call_at(self._drain_due(), self._drain_expired)

        def _drain_stop(self) -> None:
            if self._drain_timer is not None:
                self._drain_timer.cancel()
                self._drain_timer = None

        def _drain_expired(self) -> None:
            # One timer for the whole drain: the bytes only move its due time, checked here.
            self._drain_timer = None
            if self._guard_lost:
                return
            loop = asyncio.get_running_loop()
            due = self._drain_due()
            if loop.time() < due:
                self._drain_timer = loop.call_at(due, self._drain_expired)
                return
            if self._lingering or self._phase() == _DRAIN:
                if self._drain_until is None:  # not the lingering close after a cut, which is the rule
                    log.info(
                        "closing a connection: the answered request's body stopped or came slower "
                        "than %d bytes/s (%d bytes dropped)",
                        min_rate,
                        self._drain_bytes,
                    )
                self._guard_finish()

        def _idle_expired(self) -> None:
            self._idle_timer = None
            if not self._guard_lost and not self._guard_pending and self._phase() == _IDLE:
                self._guard_finish()  # silently, as uvicorn's keep-alive timer does

        def _idle_stop(self) -> None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

        # --- closing ---------------------------------------------------------------------------

        def _guard_close(self) -> None:
            """uvicorn's ``transport.close()``: a lingering close while the current request's body
            is still coming (a client sending it would get a reset, not the answer), else at once."""
            real = self._guard_real
            cycle = self.cycle
            if (
                self._guard_lost
                or real.is_closing()
                or real.get_protocol() is not self  # upgraded: the new protocol closes
                or cycle is None
                or not self._body_pending(cycle)
            ):
                self._guard_finish()
            else:
                self._guard_linger(until=None)

        def _guard_linger(self, until: float | None) -> None:
            """Half-closes (the answer goes out with a FIN), then reads and drops until the client
            closes (the transport closes itself on its FIN) or a bound passes: ``until`` when
            given, else the drain's (continued where a drain was under way)."""
            real = self._guard_real
            self._guard_stop()
            self._idle_stop()
            self._lingering = True
            self._guard_transport.closing = True
            now = asyncio.get_running_loop().time()
            if until is not None or self._drain_cycle is not self.cycle:
                self._drain_begin(self.cycle, now)
            self._drain_until = until
            self._drain_last = now
            self._drain_arm()
            real.resume_reading()  # uvicorn may have paused it, the app not reading the body
            if real.can_write_eof():
                real.write_eof()

        def _linger_received(self, size: int) -> None:
            self._drain_bytes += size
            self._drain_last = asyncio.get_running_loop().time()
            if self._drain_bytes > drain_max:
                log.info("closing a connection: the answered request's body passes %d bytes", drain_max)
                self._guard_finish()

        def _guard_finish(self) -> None:
            self._guard_stop()
            self._drain_stop()
            self._idle_stop()
            self._lingering = True  # whatever still arrives is dropped
            self._guard_transport.closing = True
            self._guard_real.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def _count(scope: Scope, reason: str) -> None:
    """One rejection under ``reason``, counted once: as the error of the scope's inference
    request where there is one (the accounting counts it, service/accounting.py; the app's
    later 499 is a consequence, not a second rejection), else directly."""
    call = scope.get("state", {}).get("call")
    if call is not None:
        call.fail(APIError(408, "the request body arrived too slowly", "request_timeout", reason=reason))
        return
    state = getattr(getattr(scope.get("app"), "state", None), "service", None)
    accounting = getattr(state, "accounting", None)
    if accounting is not None:
        accounting.cut(reason)


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
                    # of the body is then the protocol's to drop (its drain, bounded).
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
