"""Downloading a job's `image_url` without letting the job reach the worker's own network.

The RunPod SDK has an SSRF-safe fetcher (`runpod.serverless.utils.rp_ssrf.safe_get`); this
module keeps its semantics (http(s) only, every resolved address of every redirect hop must
be public, the connection goes to the checked address, a streamed size cap, and the same
`RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS` escape hatch) but not its code, because that code

* bounds each socket read, not the download: a server that drips a byte at a time keeps it
  going indefinitely; here one deadline covers DNS, connecting, TLS, every hop, the status
  line, every header, every `100 Continue`, every chunk-size line and the last byte: each
  read on the socket is given only the time that is left;
* resolves names with no time limit (`getaddrinfo` can hang); here resolution has a deadline;
* passes the IPv6 forms that carry an IPv4 address inside them (6to4 2002::/16, NAT64
  64:ff9b::/96, Teredo) whenever the outer address is global; here the inner one is checked;
* uses `requests`, which may decompress gzip bodies beyond the cap's intent; here the worker
  asks for the identity encoding and counts the bytes on the wire.

It reuses the SDK's address classification (`is_safe_address`) for everything else.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from runpod.serverless.utils.rp_ssrf import is_safe_address

Resolver = Callable[[str, int], list[str]]
Connector = Callable[[tuple[str, int], float], socket.socket]

_REDIRECTS = frozenset((301, 302, 303, 307, 308))
_CHUNK = 1 << 16
_HEADERS = {
    "User-Agent": "sharp-runpod-worker",
    "Accept": "image/*, */*;q=0.5",
    "Accept-Encoding": "identity",
}
_MAX_HOST_NAME = 253
_MAX_LABEL = 63
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Name lookups run here so that a hung resolver costs a thread, not the job's deadline.
_RESOLVER_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="dns")


class FetchError(ValueError):
    """The URL cannot be used; the message is meant for the client."""


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    connect_timeout_s: float
    total_timeout_s: float
    allow_private: bool  # the SDK's RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS
    max_redirects: int = 5


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_public_address(ip: str) -> bool:
    """True only for a global unicast address that hides no private IPv4 address inside."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    inner = _embedded_ipv4(address)
    if inner is not None and not is_safe_address(str(inner)):
        return False
    return is_safe_address(ip)


def _embedded_ipv4(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | None:
    if address.version == 4:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # (server, client): the client is where traffic goes
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def fetch(
    url: str,
    policy: FetchPolicy,
    *,
    resolve: Resolver = system_resolve,
    connect: Connector = socket.create_connection,
) -> bytes:
    """The body of a 200 answer to GET `url`, following redirects; FetchError otherwise."""
    clock = _Deadline(time.monotonic() + policy.total_timeout_s, policy.total_timeout_s)
    current = url
    for _ in range(policy.max_redirects + 1):
        target = _parse(current)
        clock.stage = f"resolving {target.host}"
        addresses = _resolve_checked(target, policy, resolve, clock)
        sock = _connect(target, addresses, policy, connect, clock)
        channel = sock
        response = None
        try:
            channel = _secure(target, sock, clock)
            response = _get(_http_connection(target, channel, clock), target, clock)
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"image_url redirected ({response.status}) without a Location")
                current = urljoin(current, location)
                continue
            if response.status != 200:
                raise FetchError(
                    f"image_url answered HTTP {response.status} {response.reason}; "
                    "check that the URL is right and publicly readable"
                )
            return _read_capped(response, policy, clock)
        finally:
            if response is not None:
                response.close()
            channel.close()
            sock.close()
    raise FetchError(f"image_url redirected more than {policy.max_redirects} times")


class _DeadlineExceeded(Exception):
    pass


@dataclass
class _Deadline:
    """The download's one deadline and what it was doing, for the message when it passes."""

    at: float
    total_s: float
    stage: str = "starting"

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise _DeadlineExceeded
        return left

    def error(self) -> FetchError:
        return FetchError(
            f"downloading image_url took longer than {self.total_s:g} s, the limit on the "
            f"whole download (SHARP_URL_TIMEOUT_S), while {self.stage}; host the image "
            "somewhere faster or send it inline as base64"
        )


class _DeadlineReader(io.RawIOBase):
    """The socket as http.client reads it: every read waits at most until the deadline."""

    def __init__(self, sock: socket.socket, clock: _Deadline) -> None:
        self._sock = sock
        self._clock = clock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            self._sock.settimeout(self._clock.left())
            return self._sock.recv_into(buffer)
        except TimeoutError:
            raise _DeadlineExceeded from None


class _DeadlineSocket:
    """What http.client needs of a socket (send, makefile, close), bound to the deadline."""

    def __init__(self, sock: socket.socket, clock: _Deadline) -> None:
        self._sock = sock
        self._clock = clock

    def sendall(self, data: bytes) -> None:
        try:
            self._sock.settimeout(self._clock.left())
            self._sock.sendall(data)
        except TimeoutError:
            raise _DeadlineExceeded from None

    def makefile(self, mode: str, *args: object, **kwargs: object) -> io.BufferedReader:
        if mode != "rb":
            raise ValueError(f"unsupported makefile mode {mode!r}")
        return io.BufferedReader(_DeadlineReader(self._sock, self._clock))

    def close(self) -> None:
        pass  # `fetch` closes the real socket once the response is done with it


def _parse(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise FetchError(f"image_url is not a valid URL: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = f"'{scheme}'" if scheme else "none"
        raise FetchError(f"image_url must be an http:// or https:// URL (scheme: {shown})")
    if not parts.hostname:
        raise FetchError("image_url has no host name")
    _check_host_name(parts.hostname)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, parts.hostname, port or (443 if scheme == "https" else 80), path)


def _resolve_checked(
    target: _Target, policy: FetchPolicy, resolve: Resolver, clock: _Deadline
) -> list[str]:
    lookup = _RESOLVER_POOL.submit(resolve, target.host, target.port)
    try:
        addresses = lookup.result(timeout=_left(clock))
    except concurrent.futures.TimeoutError:
        raise clock.error() from None
    except (OSError, UnicodeError) as error:  # UnicodeError: a label the IDNA codec refuses
        reason = getattr(error, "strerror", None) or str(error)
        raise FetchError(
            f"cannot resolve the host name {target.host!r} in image_url: {reason}"
        ) from None
    if not addresses:
        raise FetchError(f"the host name {target.host!r} in image_url has no address")
    if not policy.allow_private:
        # Fail closed: a name with one public and one private address is treated as hostile.
        for address in addresses:
            if not is_public_address(address):
                raise FetchError(
                    f"image_url host {target.host!r} resolves to {address}, which is not a "
                    "public internet address (private, loopback, link-local, multicast, "
                    "reserved or cloud metadata); only public URLs are fetched"
                )
    return addresses


def _check_host_name(host: str) -> None:
    """The DNS limits, checked here so that a client's typo is named as one."""
    if len(host) > _MAX_HOST_NAME:
        raise FetchError(
            f"the host name in image_url is {len(host)} characters long; "
            f"DNS allows at most {_MAX_HOST_NAME}"
        )
    if ":" in host:  # an IPv6 literal has no labels
        return
    for label in host.rstrip(".").split("."):
        if not 0 < len(label) <= _MAX_LABEL:
            raise FetchError(
                f"the host name in image_url has a label of {len(label)} characters "
                f"({label[:20]!r}{'...' if len(label) > 20 else ''}); DNS labels are "
                f"1 to {_MAX_LABEL} characters long"
            )


def _left(clock: _Deadline) -> float:
    try:
        return clock.left()
    except _DeadlineExceeded:
        raise clock.error() from None


def _connect(
    target: _Target,
    addresses: list[str],
    policy: FetchPolicy,
    connect: Connector,
    clock: _Deadline,
) -> socket.socket:
    """A socket to one of the checked addresses: the name is never resolved again."""
    error: OSError | None = None
    clock.stage = f"connecting to {target.host}"
    for address in addresses:
        timeout = min(policy.connect_timeout_s, _left(clock))
        try:
            return connect((address, target.port), timeout)
        except OSError as failure:
            error = failure
    if isinstance(error, TimeoutError):
        _left(clock)  # the whole download's deadline, if that is what ran out
        reason = (
            f"no answer within {policy.connect_timeout_s:g} s, the connection limit "
            "(SHARP_URL_CONNECT_TIMEOUT_S)"
        )
    else:
        reason = str(error)
    raise FetchError(f"cannot connect to {target.host} for image_url: {reason}")


def _secure(target: _Target, sock: socket.socket, clock: _Deadline) -> socket.socket:
    """`sock` itself for http, wrapped in TLS for https, the handshake within the deadline."""
    if target.scheme != "https":
        return sock
    clock.stage = f"negotiating TLS with {target.host}"
    try:
        # One timeout covers the whole handshake, however many reads it takes.
        sock.settimeout(_left(clock))
        # SNI and certificate checks use the URL's name while the socket stays pinned.
        return ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
    except TimeoutError:
        raise clock.error() from None
    except OSError as failure:  # ssl.SSLError and certificate errors included
        raise FetchError(f"TLS with {target.host} failed for image_url: {failure}") from None


def _http_connection(
    target: _Target, sock: socket.socket, clock: _Deadline
) -> http.client.HTTPConnection:
    kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    connection = kind(target.host, target.port)
    # http.client only connects itself when it has no socket. It drops the socket once a
    # response says the connection will close; `fetch` closes it after the last byte.
    connection.sock = _DeadlineSocket(sock, clock)
    return connection


def _get(
    connection: http.client.HTTPConnection, target: _Target, clock: _Deadline
) -> http.client.HTTPResponse:
    try:
        clock.stage = f"sending the request to {target.host}"
        connection.request("GET", target.path, headers=_HEADERS)
        clock.stage = f"waiting for the status line and headers from {target.host}"
        return connection.getresponse()
    except (_DeadlineExceeded, TimeoutError):
        raise clock.error() from None
    except (OSError, http.client.HTTPException) as error:
        raise FetchError(f"image_url request to {target.host} failed: {error!r}") from None


def _read_capped(
    response: http.client.HTTPResponse, policy: FetchPolicy, clock: _Deadline
) -> bytes:
    too_large = FetchError(
        f"the image at image_url is larger than {policy.max_bytes:,} bytes, the limit on "
        "images (SHARP_MAX_IMAGE_BYTES); send a smaller image"
    )
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise too_large
    clock.stage = "reading the image"
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = response.read1(_CHUNK)  # chunk-size lines included, each read bounded
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:  # Content-Length may be absent or a lie
                raise too_large
            chunks.append(chunk)
    except (_DeadlineExceeded, TimeoutError):
        raise clock.error() from None
    except (OSError, http.client.HTTPException) as error:
        raise FetchError(f"the download from image_url broke off: {error!r}") from None
    return b"".join(chunks)
