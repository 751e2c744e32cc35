"""Downloading a job's `image_url` without letting the job reach the worker's own network.

The RunPod SDK has an SSRF-safe fetcher (`runpod.serverless.utils.rp_ssrf.safe_get`); this
module keeps its semantics (http(s) only, every resolved address of every redirect hop must
be public, the connection goes to the checked address, a streamed size cap, and the same
`RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS` escape hatch) but not its code, because that code

* bounds each socket read, not the download: a server that drips a byte at a time keeps it
  going indefinitely; here one deadline covers DNS, every hop and the last byte;
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
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    deadline = time.monotonic() + policy.total_timeout_s
    current = url
    for _ in range(policy.max_redirects + 1):
        target = _parse(current)
        addresses = _resolve_checked(target, policy, resolve, deadline)
        connection = _open(target, addresses, policy, connect, deadline)
        # http.client drops its socket once a response says the connection will close;
        # the deadline needs it until the last byte.
        sock = connection.sock
        response = None
        try:
            response = _get(connection, sock, target, policy, deadline)
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
            return _read_capped(sock, response, policy, deadline)
        finally:
            if response is not None:
                response.close()
            connection.close()
            sock.close()
    raise FetchError(f"image_url redirected more than {policy.max_redirects} times")


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
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, parts.hostname, port or (443 if scheme == "https" else 80), path)


def _remaining(deadline: float, policy: FetchPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(policy)
    return left


def _timed_out(policy: FetchPolicy) -> FetchError:
    return FetchError(
        f"downloading image_url took longer than {policy.total_timeout_s:g} s; "
        "host the image somewhere faster or send it inline as base64"
    )


def _resolve_checked(
    target: _Target, policy: FetchPolicy, resolve: Resolver, deadline: float
) -> list[str]:
    lookup = _RESOLVER_POOL.submit(resolve, target.host, target.port)
    try:
        addresses = lookup.result(timeout=_remaining(deadline, policy))
    except concurrent.futures.TimeoutError:
        raise _timed_out(policy) from None
    except OSError as error:
        reason = error.strerror or str(error)
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


def _open(
    target: _Target,
    addresses: list[str],
    policy: FetchPolicy,
    connect: Connector,
    deadline: float,
) -> http.client.HTTPConnection:
    """A connection to one of the checked addresses: the name is never resolved again."""
    error: OSError | None = None
    for address in addresses:
        timeout = min(policy.connect_timeout_s, _remaining(deadline, policy))
        try:
            sock = connect((address, target.port), timeout)
            break
        except OSError as failure:
            error = failure
    else:
        reason = "timed out" if isinstance(error, TimeoutError) else str(error)
        raise FetchError(f"cannot connect to {target.host} for image_url: {reason}")
    if target.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            target.host, target.port
        )
        try:
            # SNI and certificate checks use the URL's name while the socket stays pinned.
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
        except OSError as failure:  # ssl.SSLError and certificate errors included
            sock.close()
            raise FetchError(f"TLS with {target.host} failed for image_url: {failure}") from None
    else:
        connection = http.client.HTTPConnection(target.host, target.port)
    connection.sock = sock  # http.client only connects itself when it has no socket
    return connection


def _get(
    connection: http.client.HTTPConnection,
    sock: socket.socket,
    target: _Target,
    policy: FetchPolicy,
    deadline: float,
) -> http.client.HTTPResponse:
    try:
        sock.settimeout(_remaining(deadline, policy))
        connection.request("GET", target.path, headers=_HEADERS)
        return connection.getresponse()
    except TimeoutError:
        raise _timed_out(policy) from None
    except (OSError, http.client.HTTPException) as error:
        raise FetchError(f"image_url request to {target.host} failed: {error}") from None


def _read_capped(
    sock: socket.socket,
    response: http.client.HTTPResponse,
    policy: FetchPolicy,
    deadline: float,
) -> bytes:
    too_large = FetchError(
        f"the image at image_url is larger than {policy.max_bytes:,} bytes; "
        "send a smaller image (SHARP_MAX_IMAGE_BYTES sets this limit)"
    )
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            # read1 returns after one socket read, so the deadline is checked between reads.
            sock.settimeout(_remaining(deadline, policy))
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > policy.max_bytes:  # Content-Length may be absent or a lie
                raise too_large
            chunks.append(chunk)
    except TimeoutError:
        raise _timed_out(policy) from None
    except (OSError, http.client.HTTPException) as error:
        raise FetchError(f"the download from image_url broke off: {error!r}") from None
    return b"".join(chunks)
