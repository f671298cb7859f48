"""`redis+sentinel://` URLs (Redis behind Sentinel: the admission state, the cache and the Celery
broker) and `redis+cluster://` URLs (Redis Cluster: the admission state and the cache; kombu has no
Cluster transport, so never the broker). Pure parsing, no Django: config/settings.py uses it too."""

from __future__ import annotations

from dataclasses import dataclass

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def _hosts(hostlist: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for item in filter(None, hostlist.split(",")):
        if item.startswith("["):  # [IPv6]:port
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = item.partition(":")
        hosts.append((host, int(port) if port else default_port))
    return hosts


@dataclass(frozen=True)
class SentinelURL:
    """`redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?sentinel_password=...]`
    (port 26379 when left out; `rediss+sentinel://` for TLS to the data nodes). The password is the
    data nodes'; Sentinels that need their own take `sentinel_password`."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    ssl: bool = False

    def master_kwargs(self) -> dict:
        return {"db": self.db, **_credentials(self.username, self.password, self.ssl)}

    def sentinel_kwargs(self, timeout: float) -> dict:
        out: dict = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if self.sentinel_password:
            out["password"] = self.sentinel_password
        return out


def sentinel_url(url: str) -> SentinelURL | None:
    """The parts of a `redis+sentinel://` URL, or None for any other URL."""
    from urllib.parse import parse_qs, unquote

    if not url.startswith(SENTINEL_SCHEMES):
        return None
    u = _split(url, 26379)
    parts = [p for p in u.path.split("/") if p]
    if not u.hosts or not parts:
        raise ValueError(f"{u.scheme}:// URL needs host:port[,host:port...]/service[/db]")
    return SentinelURL(hosts=u.hosts, service=unquote(parts[0]), db=int(parts[1]) if len(parts) > 1 else 0,
                       username=u.username, password=u.password,
                       sentinel_password=parse_qs(u.query).get("sentinel_password", [None])[0], ssl=u.ssl)


@dataclass(frozen=True)
class ClusterURL:
    """`redis+cluster://[[user]:password@]host:port[,host:port...][/]` (port 6379 when left out;
    `rediss+cluster://` for TLS): a few nodes of a Redis Cluster, from which the client learns the
    rest and the slot map. A cluster has one database, so no `/db`."""

    hosts: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    ssl: bool = False

    def node_kwargs(self) -> dict:
        return _credentials(self.username, self.password, self.ssl)


def cluster_url(url: str) -> ClusterURL | None:
    """The parts of a `redis+cluster://` URL, or None for any other URL."""
    if not url.startswith(CLUSTER_SCHEMES):
        return None
    u = _split(url, 6379)
    if not u.hosts:
        raise ValueError(f"{u.scheme}:// URL needs host:port[,host:port...]")
    if u.path.strip("/") not in ("", "0"):
        raise ValueError(f"{u.scheme}:// URL: a Redis Cluster has only database 0 (got /{u.path.strip('/')})")
    return ClusterURL(hosts=u.hosts, username=u.username, password=u.password, ssl=u.ssl)


@dataclass(frozen=True)
class _Parts:
    scheme: str
    hosts: tuple[tuple[str, int], ...]
    path: str
    query: str
    username: str | None
    password: str | None
    ssl: bool


def _split(url: str, default_port: int) -> _Parts:
    """A multi-host Redis URL (`scheme://[[user]:password@]host:port[,host:port...][/path][?query]`)."""
    from urllib.parse import unquote

    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hostlist = netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    return _Parts(scheme=scheme, hosts=tuple(_hosts(hostlist, default_port)), path=path, query=query,
                  username=unquote(username) or None, password=unquote(password) or None,
                  ssl=scheme.startswith("rediss"))


def _credentials(username: str | None, password: str | None, ssl: bool) -> dict:
    out: dict = {}
    if username:
        out["username"] = username
    if password:
        out["password"] = password
    if ssl:
        out["ssl"] = True
    return out


def celery_broker_refused(url: str) -> str:
    """Why a broker URL cannot be used ("" when it can): kombu has no Redis Cluster transport."""
    if url.startswith(CLUSTER_SCHEMES):
        return ("CELERY_BROKER_URL: Redis Cluster (redis+cluster://) is not supported as the Celery broker: "
                "kombu has no Cluster transport. Use a single Redis (redis://) or Redis behind Sentinel "
                "(redis+sentinel://) for the broker; REDIS_URL may still be a cluster.")
    return ""


def celery_broker(url: str) -> tuple[str, dict]:
    """kombu's form of a `redis+sentinel://` broker URL: `sentinel://h1:p1;sentinel://h2:p2` (with the
    data nodes' password and db) and the transport options naming the master."""
    s = sentinel_url(url)
    auth = f":{s.password}@" if s.password else ""
    hosts = ";".join(f"sentinel://{auth}{h if ':' not in h else f'[{h}]'}:{p}/{s.db}" for h, p in s.hosts)
    options: dict = {"master_name": s.service}
    if s.sentinel_password:
        options["sentinel_kwargs"] = {"password": s.sentinel_password}
    return hosts, options


def django_cache(url: str, timeout: float) -> dict:
    """django-redis' form of it: the SentinelClient, with its connection factory set globally
    (DJANGO_REDIS_CONNECTION_FACTORY = 'django_redis.pool.SentinelConnectionFactory')."""
    s = sentinel_url(url)
    auth = f":{s.password}@" if s.password else ""
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": f"redis://{auth}{s.service}/{s.db}",
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.SentinelClient", "SENTINELS": list(s.hosts),
                    "SENTINEL_KWARGS": s.sentinel_kwargs(timeout), "SOCKET_CONNECT_TIMEOUT": timeout,
                    "SOCKET_TIMEOUT": timeout},
        "KEY_PREFIX": "llms",
    }
