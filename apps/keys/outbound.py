"""Outbound webhooks: where they may go, and how they are signed.

Budget alerts and async-request callbacks POST to URLs that tenants choose. Without a guard a
tenant could make the gateway call its own loopback services, the cloud metadata endpoint or the
private network, and read the outcome back as a port scanner. So:

- A destination must be public: every address its host resolves to is checked, and loopback,
  private, shared, link-local, multicast, unspecified and reserved ranges are refused, for IPv4,
  IPv6, IPv4 embedded in IPv6 (mapped, NAT64, 6to4, Teredo) and the legacy integer forms
  (`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`).
- The check happens where the socket is opened (`_GuardedBackend.connect_tcp`): the host is
  resolved once, the addresses are checked, and the connection goes to a checked address, with the
  original Host header and TLS server name. A DNS answer that changes between a configuration-time
  check and the delivery (rebinding) is therefore caught. Redirects are not followed, proxies from
  the environment are not used.
- Operators let internal receivers through with WEBHOOK_ALLOWED_HOSTS: host names (exact) or
  CIDRs (`10.1.2.0/24`, `127.0.0.1`).
- One signature format for every webhook: `X-LLM-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
  "<t>.<raw body>">`, keyed with the tenant's webhook secret; receivers reject old timestamps
  (`signature_verify`), so a captured delivery cannot be replayed later.

Imports nothing of ours but settings: billing and gateway both use it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
import time
from urllib.parse import urlsplit

import httpcore
import httpx
from django.conf import settings

SIGNATURE_HEADER = "X-LLM-Signature"
SIGNATURE_TOLERANCE_S = 300

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMERIC_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


class DestinationRefused(Exception):
    """The URL may not be fetched (scheme, host or address not allowed). Permanent: a retry gets
    the same answer. The message names the reason; it is for the operator's log and for the
    person configuring the URL, not for delivery statuses."""


# --- addresses --------------------------------------------------------------------------------


def _ipv4_legacy(host: str) -> ipaddress.IPv4Address | None:
    """The WHATWG/inet_aton reading of a host made of numbers: `2130706433`, `0x7f000001`,
    `0177.0.0.1`, `127.1`. None when the host is not numeric (a name); refused when it looks
    numeric but is not a valid address."""
    parts = host.split(".")
    if parts and parts[-1] == "":
        parts.pop()
    if not parts or not _NUMERIC_PART.match(parts[-1]):
        return None
    if len(parts) > 4 or not all(_NUMERIC_PART.match(p) for p in parts):
        raise DestinationRefused(f"'{host}' is not a valid address")
    numbers = []
    for p in parts:
        if p.startswith("0x"):
            numbers.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p.startswith("0"):
            if not set(p) <= set("01234567"):
                raise DestinationRefused(f"'{host}' is not a valid address")
            numbers.append(int(p, 8))
        else:
            numbers.append(int(p))
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise DestinationRefused(f"'{host}' is not a valid address")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def ip_literal(host: str) -> IPAddress | None:
    """The address a URL host names literally (any notation), or None for a host name."""
    h = host.strip("[]").lower()
    try:
        return ipaddress.ip_address(h.split("%", 1)[0])
    except ValueError:
        pass
    return _ipv4_legacy(h)


def address_forbidden(ip: IPAddress) -> bool:
    """True for anything but a public unicast address (IPv4 inside IPv6 is judged as IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return address_forbidden(ip.ipv4_mapped)
        embedded = [ip.sixtofour]
        if ip.teredo is not None:
            embedded.append(ip.teredo[1])
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(e is not None and address_forbidden(e) for e in embedded):
            return True
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified)


def _allow_list() -> tuple[frozenset[str], tuple]:
    names, nets = set(), []
    for entry in getattr(settings, "WEBHOOK_ALLOWED_HOSTS", ()) or ():
        entry = entry.strip().lower()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry.rstrip("."))
    return frozenset(names), tuple(nets)


def _allowed_by_network(ip: IPAddress, nets) -> bool:
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(c.version == n.version and c in n for c in candidates for n in nets)


def _resolve(host: str, port: int) -> list[str]:
    """The addresses of `host`, in the resolver's order (the seam tests patch)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _check_name(host: str) -> str:
    name = host.lower().rstrip(".")
    try:
        name = name.encode("idna").decode("ascii")  # what httpx sends to DNS for a Unicode name
    except UnicodeError:
        raise DestinationRefused(f"'{host}' is not a valid host name") from None
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise DestinationRefused(f"'{host}' is not a valid host name")
    return name


def _refuse_address(host: str, ip: IPAddress, *, literal: bool) -> DestinationRefused:
    """Literal addresses are named (normalised: `0177.0.0.1` is 127.0.0.1); what a name resolves to
    is not, since this message may reach whoever typed the URL."""
    what = (f"{ip}" if str(ip) == host.strip("[]") else f"'{host}' ({ip})") if literal else f"'{host}' resolves to"
    return DestinationRefused(f"{what} {'is not' if literal else 'an address that is not'} a public address "
                              "(webhooks go to public addresses unless the operator allows the host)")


def destination_addresses(host: str, port: int) -> list[IPAddress]:
    """Resolve `host` once and return the addresses a connection may use, or refuse. Every address
    must be allowed: a name that resolves to one public and one private address is refused."""
    names, nets = _allow_list()
    literal = ip_literal(host)
    if literal is not None:
        if address_forbidden(literal) and not _allowed_by_network(literal, nets):
            raise _refuse_address(host, literal, literal=True)
        return [literal]
    name = _check_name(host)
    try:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in _resolve(name, port)]
    except OSError as exc:
        raise httpcore.ConnectError(f"cannot resolve {name}: {exc}") from exc
    if not addresses:
        raise httpcore.ConnectError(f"cannot resolve {name}")
    if name in names:
        return addresses
    for ip in addresses:
        if address_forbidden(ip) and not _allowed_by_network(ip, nets):
            raise _refuse_address(host, ip, literal=False)
    return addresses


def url_check(url: str, *, resolve: bool = True) -> None:
    """Refuse (DestinationRefused, with a reason fit to show whoever configures the URL) a URL a
    webhook may not be sent to. `resolve=False` checks without DNS (scheme, syntax, literal
    addresses, `localhost`): for the request path; delivery checks the resolved address anyway.
    With `resolve=True` a name that does not resolve now is accepted: delivery decides."""
    if not isinstance(url, str) or not url:
        raise DestinationRefused("must be an http(s) URL")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise DestinationRefused(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise DestinationRefused("must be an http(s) URL")
    host = parts.hostname or ""
    if not host:
        raise DestinationRefused("must name a host")
    names, nets = _allow_list()
    if host.rstrip(".") in names:
        return
    literal = ip_literal(host)
    if literal is not None:
        if address_forbidden(literal) and not _allowed_by_network(literal, nets):
            raise _refuse_address(host, literal, literal=True)
        return
    name = _check_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        raise DestinationRefused(f"'{host}' is a loopback name")
    if resolve:
        try:
            destination_addresses(name, port or (443 if parts.scheme == "https" else 80))
        except httpcore.ConnectError:
            return


def webhook_url_validator(value: str) -> None:
    """Django validator for webhook URL fields (admin forms, the management API)."""
    from django.core.exceptions import ValidationError

    if not value:
        return
    try:
        url_check(value, resolve=True)
    except DestinationRefused as exc:
        raise ValidationError(f"Webhook URL not allowed: {exc}.", code="webhook_destination") from None


# --- the guarded HTTP client ------------------------------------------------------------------


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, connecting only to checked addresses of the requested host."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        last: Exception | None = None
        for ip in destination_addresses(host, port):
            try:
                return self._inner.connect_tcp(str(ip), port, timeout=timeout, local_address=local_address,
                                               socket_options=socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last or httpcore.ConnectError(f"cannot connect to {host}")

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise DestinationRefused("unix sockets are not webhook destinations")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport whose connections go through `_GuardedBackend` (TLS still verifies the
    certificate against the URL's host name). No proxy: a proxy would connect on our behalf."""

    def __init__(self, **kwargs) -> None:
        super().__init__(trust_env=False, **kwargs)
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(trust_env=False),
                                             network_backend=_GuardedBackend(), max_connections=10,
                                             max_keepalive_connections=0)


def client(*, timeout: float) -> httpx.Client:
    """A client for webhook deliveries: guarded connections, no redirects, no proxies."""
    return httpx.Client(transport=GuardedTransport(), timeout=timeout, follow_redirects=False, trust_env=False)


def post(url: str, *, body: bytes, headers: dict[str, str], timeout: float,
         http: httpx.Client | None = None) -> httpx.Response:
    """POST `body` to a webhook URL. Raises DestinationRefused (permanent) or httpx.HTTPError."""
    url_check(url, resolve=False)
    if http is not None:
        return http.post(url, content=body, headers=headers)
    with client(timeout=timeout) as c:
        return c.post(url, content=body, headers=headers)


# --- signatures -------------------------------------------------------------------------------


def signature_header(*, body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The `X-LLM-Signature` value: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>." + body>`."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def signature_verify(*, header: str, body: bytes, secret: str, tolerance_s: int = SIGNATURE_TOLERANCE_S,
                     now: float | None = None) -> bool:
    """True when `header` signs `body` with `secret` and its timestamp is within `tolerance_s` of
    now (an older delivery is a replay). Receivers may copy this function as it is."""
    t, signatures = None, []
    for item in (header or "").split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            t = int(value)
        elif key == "v1":
            signatures.append(value)
    if t is None or not signatures:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, s) for s in signatures)
