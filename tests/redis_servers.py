"""Real Redis topologies started by tests on loopback, from Debian's `redis-server` (a Sentinel is
`redis-server <conf> --sentinel`) and `redis-cli`: a master with a replica watched by Sentinels, and
a Redis Cluster of three masters (each with a replica when asked). Never the shared servers.

Every wait polls a condition with a deadline (no sleeps to wait)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
needs_redis_server = pytest.mark.skipif(REDIS_SERVER is None,
                                        reason="needs the redis-server binary (Debian: redis-server)")
needs_redis_cluster = pytest.mark.skipif(REDIS_SERVER is None or REDIS_CLI is None,
                                         reason="needs the redis-server and redis-cli binaries (Debian: redis-server, "
                                                "redis-tools)")


def free_port(*, bus: bool = False) -> int:
    """A free loopback port (with `bus`: one whose cluster bus port, +10000, is free too)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus:
            return port
        if port + 10000 <= 65535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                pass


def poll(check, what: str, bound_s: float = 30.0):
    """The first truthy `check()` (Redis and socket errors count as not yet), or AssertionError."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            result = check()
            if result:
                return result
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)


class _Servers:
    BASE = ("--bind", "127.0.0.1", "--save", "", "--appendonly", "no")

    def __init__(self, tmp_path):
        self.procs: dict[str, subprocess.Popen] = {}
        self.tmp = tmp_path

    def _start(self, name, *args):
        self.procs[name] = subprocess.Popen([REDIS_SERVER, *args], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=self.tmp)

    def kill(self, name):
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


class SentinelSet(_Servers):
    """One master, one replica, `sentinels` Sentinels (quorum: a majority) monitoring `mymaster`."""

    def __init__(self, tmp_path, sentinels: int = 1):
        super().__init__(tmp_path)
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_port = self.sentinel_ports[0]

    def start(self):
        self._start("master", "--port", str(self.master_port), *self.BASE)
        self._start("replica", "--port", str(self.replica_port), *self.BASE,
                    "--replicaof", "127.0.0.1", str(self.master_port))
        quorum = len(self.sentinel_ports) // 2 + 1
        for i, port in enumerate(self.sentinel_ports):
            conf = self.tmp / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\n"
                            f"sentinel monitor mymaster 127.0.0.1 {self.master_port} {quorum}\n"
                            "sentinel down-after-milliseconds mymaster 400\n"
                            "sentinel failover-timeout mymaster 4000\n")
            self._start(f"sentinel-{i}", str(conf), "--sentinel")
        replica = client(self.replica_port)
        poll(lambda: replica.info("replication").get("master_link_status") == "up", "the replica to sync")
        for port in self.sentinel_ports:
            poll(lambda p=port: client(p).sentinel_slaves("mymaster"), "the Sentinels to see the replica")
        if len(self.sentinel_ports) > 1:
            poll(lambda: all(int(client(p).sentinel_master("mymaster")["num-other-sentinels"])
                             == len(self.sentinel_ports) - 1 for p in self.sentinel_ports),
                 "the Sentinels to see each other")
        return self

    client = staticmethod(client)

    def url(self, db=0):
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/mymaster/{db}"

    def master_port_now(self) -> int:
        _host, port = client(self.sentinel_port).sentinel_get_master_addr_by_name("mymaster")
        return int(port)


class ClusterSet(_Servers):
    """A Redis Cluster of three masters (and one replica each with `replicas=True`) on loopback."""

    def __init__(self, tmp_path, replicas: bool = False):
        super().__init__(tmp_path)
        self.ports = [free_port(bus=True) for _ in range(6 if replicas else 3)]
        self.replicas = replicas

    def start(self):
        for port in self.ports:
            self._start(str(port), "--port", str(port), *self.BASE, "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "1000")
        for port in self.ports:
            poll(lambda p=port: client(p).ping(), "the cluster nodes to answer")
        subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "1" if self.replicas else "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        poll(lambda: all(client(p).cluster("info")["cluster_state"] == "ok" for p in self.ports),
             "the cluster to be ok on every node")
        if self.replicas:
            poll(lambda: sum(1 for p in self.ports
                             if client(p).info("replication").get("master_link_status") == "up") == 3,
                 "the replicas to sync")
        return self

    client = staticmethod(client)

    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2]) + "/"

    def node_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        for start, end, master, *_replicas in client(self.ports[0]).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise AssertionError(f"no node serves slot {slot}")

    def replica_of(self, master_port: int) -> int:
        for port in self.ports:
            info = client(port).info("replication")
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master_port:
                return port
        raise AssertionError(f"no replica of {master_port}")
