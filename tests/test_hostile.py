"""Hostile and careless input: each case gets a clear client error naming what is wrong, or a
correct result. Grouped by class: slow image URLs, focal lengths, request fields, hostile
splat files for `convert`, and start-up configuration.

The slow servers are real sockets on 127.0.0.1 driven by a thread of this test; every case
is bounded in time by the limit it checks.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from handler.fetch import FetchError, FetchPolicy, fetch

# --- 1. image URLs: one deadline, however the server behaves ------------------------------

TOTAL_S = 1.0
POLICY = FetchPolicy(1_000_000, connect_timeout_s=2, total_timeout_s=TOTAL_S, allow_private=True)
# The deadline plus what a shared, busy machine may add before the error is raised.
SLACK_S = 1.5

Script = Callable[[socket.socket, threading.Event], None]


@contextmanager
def raw_server(script: Script) -> Iterator[int]:
    """A TCP server on loopback that runs `script` on every connection; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_run, args=(conn,), daemon=True).start()

    def _run(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)  # the request
                script(conn, stop)
            except OSError:  # the client hung up, as it should at its deadline
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def drip(*parts: bytes, every_s: float, then: bytes = b"", repeat: bool = False) -> Script:
    """Send `parts` one at a time, `every_s` apart (forever when `repeat`), then `then`."""

    def script(conn: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            for part in parts:
                if stop.wait(every_s):
                    return
                conn.sendall(part)
            if not repeat:
                break
        conn.sendall(then)
        stop.wait(30)

    return script


def _status_line_byte_by_byte() -> Script:
    return drip(*(bytes([b]) for b in b"HTTP/1.1 200 OK\r\n"), every_s=0.1)


def _headers_dripping() -> Script:
    return drip(b"HTTP/1.1 200 OK\r\n", *[b"X-Drip: 1\r\n"] * 50, every_s=0.1)


def _endless_continue() -> Script:
    # No pause at all: every read is instant, only the deadline can end it.
    def script(conn: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 64)

    return script


def _chunk_size_byte_by_byte() -> Script:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head)
        while not stop.wait(0.1):
            conn.sendall(b"0")  # a chunk-size line that never ends

    return script


def _slow_body() -> Script:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    return drip(head, *[b"\xff"] * 1000, every_s=0.05)


def _silent() -> Script:
    return lambda conn, stop: stop.wait(30)


@pytest.mark.parametrize(
    ("script", "scheme", "stage"),
    [
        (_status_line_byte_by_byte, "http", "waiting for the status line and headers"),
        (_headers_dripping, "http", "waiting for the status line and headers"),
        (_endless_continue, "http", "waiting for the status line and headers"),
        (_silent, "http", "waiting for the status line and headers"),
        (_chunk_size_byte_by_byte, "http", "reading the image"),
        (_slow_body, "http", "reading the image"),
        (_silent, "https", "negotiating TLS"),
    ],
    ids=["status-line", "headers", "100-continue", "silent", "chunk-size", "body", "tls"],
)
def test_a_slow_server_is_cut_off_at_the_deadline(script, scheme, stage):
    with raw_server(script()) as port:
        start = time.monotonic()
        with pytest.raises(FetchError) as failure:
            fetch(f"{scheme}://127.0.0.1:{port}/a.jpg", POLICY)
        elapsed = time.monotonic() - start
    message = str(failure.value)
    assert "longer than 1 s, the limit on the whole download (SHARP_URL_TIMEOUT_S)" in message
    assert stage in message
    assert TOTAL_S <= elapsed < TOTAL_S + SLACK_S


def test_slow_redirects_share_one_deadline():
    def script(conn: socket.socket, stop: threading.Event) -> None:
        if not stop.wait(0.4):
            conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /again\r\nContent-Length: 0\r\n\r\n")

    with raw_server(script) as port:
        start = time.monotonic()
        with pytest.raises(FetchError, match="SHARP_URL_TIMEOUT_S"):
            fetch(f"http://127.0.0.1:{port}/a.jpg", POLICY)
        assert time.monotonic() - start < TOTAL_S + SLACK_S


def test_a_hung_name_lookup_ends_at_the_deadline():
    def hung(host: str, port: int) -> list[str]:
        time.sleep(3)
        return ["127.0.0.1"]

    start = time.monotonic()
    with pytest.raises(FetchError, match="SHARP_URL_TIMEOUT_S.*while resolving slow.test"):
        fetch("http://slow.test/a.jpg", POLICY, resolve=hung)
    assert time.monotonic() - start < TOTAL_S + SLACK_S


def test_the_connection_limit_is_named():
    def unanswered(address: tuple[str, int], timeout: float) -> socket.socket:
        raise TimeoutError("timed out")

    with pytest.raises(FetchError, match=r"no answer within 2 s.*SHARP_URL_CONNECT_TIMEOUT_S"):
        fetch("http://127.0.0.1:9/a.jpg", POLICY, connect=unanswered)


def test_a_quick_server_after_the_slow_ones_is_still_fetched():
    body = b"\x89PNG" + bytes(5000)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)

    def script(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" + head + chunks + b"0\r\n\r\n")

    with raw_server(script) as port:
        assert fetch(f"http://127.0.0.1:{port}/a.jpg", POLICY) == body


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://{'a' * 64}.example.com/a.jpg", "a label of 64 characters"),
        (f"http://{'a.' * 130}com/a.jpg", "DNS allows at most 253"),
        ("http://a..b/a.jpg", "a label of 0 characters"),
    ],
)
def test_impossible_host_names_are_the_clients_error(url, message):
    with pytest.raises(FetchError, match=message):
        fetch(url, POLICY)
