"""The connections `cnnkit serve` accepts: uvicorn's HTTP/1.1 protocol (h11) with a deadline for each
request and a cap on open connections, and its own errors as JSON.

uvicorn closes a keep-alive connection only after answering a request on it, so a client that connects
and sends nothing, or one byte of headers at a time, holds a socket for ever; enough of them use up the
process's file descriptors and every later client is locked out. Here each connection must send a whole
request (headers and body) within `timeout` seconds of opening or of its last answer, and at most
`max_connections` are open at once, below the file descriptor limit: a new connection beyond it closes
the one that has waited longest for its client, so a client that sends its request still gets an answer
while hundreds of idle sockets are open.
"""

import json
import resource
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT = 20.0  # seconds to send a whole request: a 5 MB upload at 2 Mbit/s
MAX_CONNECTIONS = 1000
# Connections the kernel queues until they are accepted. asyncio accepts up to this many in one go, and
# a connection closed to make room gives its file descriptor back a few turns of the loop later.
BACKLOG = 64
FD_RESERVE = 64 + 4 * BACKLOG  # file descriptors left for files, pipes, and connections being accepted


def connection_limit(most: int = MAX_CONNECTIONS) -> int:
    """How many connections to keep open at once: `most`, or fewer under this process's RLIMIT_NOFILE
    (FD_RESERVE descriptors left for the rest, and at least 8 connections)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return most
    return max(8, min(most, soft - FD_RESERVE))


def guarded_protocol(timeout: float = REQUEST_TIMEOUT, max_connections: int | None = None) -> type:
    """`GuardedProtocol` with these limits, for `uvicorn.Config(http=...)` (max_connections default:
    `connection_limit()`)."""
    limits = {"timeout": timeout, "max_connections": max_connections or connection_limit()}
    return type("GuardedProtocol", (GuardedProtocol,), limits)


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, with the deadline and the connection cap described above and its 400s
    (a request h11 cannot parse: a bad request line or header, headers over 16 KB) as JSON."""

    timeout = REQUEST_TIMEOUT
    max_connections = MAX_CONNECTIONS

    # While the connection waits for its client to send a request: when it began waiting (loop time),
    # whether any byte of that request came, and the timer that closes it at the deadline.
    waiting_since: float | None = None
    received = False
    deadline = None

    def connection_made(self, transport):
        super().connection_made(transport)
        self._wait_for_request()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def data_received(self, data: bytes):
        if self.waiting_since is not None:
            self.received = True
        super().data_received(data)
        self._check_request_in()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._wait_for_request()

    def connection_lost(self, exc):
        self._stop_waiting()
        super().connection_lost(exc)

    def send_400_response(self, msg: str):
        send_error(
            self.transport,
            400,
            "malformed HTTP request: a bad request line, header or body framing, or headers over 16 KB",
        )

    def _wait_for_request(self):
        self._stop_waiting()
        self.waiting_since, self.received = self.loop.time(), False
        self.deadline = self.loop.call_later(self.timeout, self._timed_out)
        self._check_request_in()  # a pipelined request may be in already

    def _check_request_in(self):
        # h11 leaves IDLE when the request's headers are in and SEND_BODY when its body is
        if self.waiting_since is not None and self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._stop_waiting()

    def _stop_waiting(self):
        if self.deadline is not None:
            self.deadline.cancel()
        self.waiting_since, self.deadline = None, None

    def _timed_out(self):
        self.deadline = None
        if self.transport.is_closing():
            return
        # The app may have answered already, before the whole body came (a 413 by Content-Length)
        answered = self.conn.their_state is h11.SEND_BODY and self.cycle.response_started
        if self.received and not answered:
            message = f"the whole request did not arrive within {self.timeout:g} s (cnnkit serve --timeout)"
            send_error(self.transport, 408, message)  # the app, if reading the body, sees a disconnect
        else:  # an idle connection: closed without a word, as keep-alive connections are
            self.transport.close()

    def _make_room(self):
        """Close the connection that has waited longest for its client; with none waiting, refuse this one."""
        waiting = [
            c for c in self.connections if getattr(c, "waiting_since", None) is not None and c is not self
        ]
        if waiting:
            oldest = min(waiting, key=lambda c: c.waiting_since)
            oldest._stop_waiting()
            oldest.transport.close()
        else:
            send_error(
                self.transport, 503, f"busy: {len(self.connections) - 1} connections are open; try again"
            )


def send_error(transport, status: int, message: str):
    """Answer `{"error": message}` with HTTP `status` straight on `transport` (outside h11) and close it."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    transport.write(head.encode("ascii") + body)
    transport.close()
