"""`redis+sentinel://` URLs: Redis behind Sentinel for the admission state, the cache and the Celery
broker. Pure parsing, no Django: config/settings.py uses it too."""

from __future__ import annotations

from dataclasses import dataclass

SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")


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
        out: dict = {"db": self.db}
        if self.username:
            out["username"] = self.username
        if self.password:
            out["password"] = self.password
        if self.ssl:
            out["ssl"] = True
        return out

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
    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hostlist = netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    hosts = []
    for item in filter(None, hostlist.split(",")):
        if item.startswith("["):  # [IPv6]:port
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = item.partition(":")
        hosts.append((host, int(port) if port else 26379))
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError(f"{scheme}:// URL needs host:port[,host:port...]/service[/db]")
    params = parse_qs(query)
    return SentinelURL(hosts=tuple(hosts), service=unquote(parts[0]), db=int(parts[1]) if len(parts) > 1 else 0,
                       username=unquote(username) or None, password=unquote(password) or None,
                       sentinel_password=params.get("sentinel_password", [None])[0],
                       ssl=scheme.startswith("rediss"))


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
