"""Redis with Sentinel on this host: a master, its replicas and three Sentinels, real redis-server processes.

For the failover tests and ``scripts/failover_bench.py``; production runs the
compose files' ``ha`` profile or its own Sentinels (docs/operations.md, "Redis
high availability"). The bundled redis-server (6.2) runs both roles: a
Sentinel is the same binary started with ``--sentinel``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ident.fleet import REPO_ROOT, EmbeddedRedis, FleetError, free_port, redis_server_binary

MASTER_NAME = "ident"
# What the compose files' Redis servers start through: as a replica of the
# master the Sentinels name, unless they name this server.
START_SCRIPT = REPO_ROOT / "deploy" / "redis-ha" / "start-redis.sh"
# Sentinel calls the master down after this long without a reply, then the
# Sentinels vote and promote the replica: failover takes about this plus 1-2 s.
DOWN_AFTER_MS = 1000


@dataclass
class SentinelGroup:
    """A master, ``replicas`` replicas of it and ``sentinels`` Sentinels watching it, on loopback."""

    password: str | None = None
    sentinel_password: str | None = None
    replicas: int = 1
    sentinels: int = 3
    master_name: str = MASTER_NAME
    down_after_ms: int = DOWN_AFTER_MS
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ident-sentinel-")))
    servers: list[EmbeddedRedis] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    sentinel_processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        """IDENT_REDIS_URL for this group: every Sentinel, the master's password in the first."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth if i == 0 else ''}127.0.0.1:{port}/0"
                        for i, port in enumerate(self.sentinel_ports))

    def env(self) -> dict[str, str]:
        """The IDENT_* settings that point the fleet at this group."""
        env = {"IDENT_REDIS_URL": self.url, "IDENT_REDIS_SENTINEL_MASTER": self.master_name}
        if self.sentinel_password:
            env["IDENT_REDIS_SENTINEL_PASSWORD"] = self.sentinel_password
        return env

    def start(self) -> "SentinelGroup":
        master = EmbeddedRedis(password=self.password).start()
        self.servers.append(master)
        for _ in range(self.replicas):
            self.servers.append(EmbeddedRedis(
                password=self.password, options=("--replicaof", "127.0.0.1", str(master.port))).start())
        self._wait(lambda: self._connected_replicas(master) >= self.replicas, 15, "the replicas to sync")
        for index in range(self.sentinels):
            self._start_sentinel(index, master.port)
        self._wait(self._sentinels_agree, 15, "the Sentinels to see each other and the replicas")
        return self

    def _start_sentinel(self, index: int, master_port: int) -> None:
        port = free_port()
        config = self.workdir / f"sentinel-{index}.conf"
        lines = [
            f"port {port}", "bind 127.0.0.1", "daemonize no", f"dir {self.workdir}",
            f"sentinel monitor {self.master_name} 127.0.0.1 {master_port} 2",
            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
            f"sentinel failover-timeout {self.master_name} 10000",
            f"sentinel parallel-syncs {self.master_name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {self.master_name} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        # Sentinel rewrites its own configuration file as it learns the group.
        config.write_text("\n".join(lines) + "\n")
        process = subprocess.Popen([redis_server_binary(), str(config), "--sentinel", "--loglevel", "warning"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.sentinel_ports.append(port)
        self.sentinel_processes.append(process)

    def sentinel(self, index: int = 0):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.sentinel_ports[index], password=self.sentinel_password,
                           socket_timeout=1, decode_responses=True)

    def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers names it now."""
        import redis

        for index in range(len(self.sentinel_ports)):
            try:
                address = self.sentinel(index).sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def master(self) -> EmbeddedRedis:
        port = self.master_port()
        for server in self.servers:
            if server.port == port:
                return server
        raise FleetError(f"no server of this group listens on the master's port {port}")

    def kill_master(self) -> EmbeddedRedis:
        """SIGKILL the current master; it is returned, stopped."""
        master = self.master()
        master.stop(kill=True)
        return master

    def restart(self, server: EmbeddedRedis) -> EmbeddedRedis:
        """Start a stopped server again the way the compose files do, through start-redis.sh:
        it asks the Sentinels first, and comes back as the current master's replica."""
        server.launcher = ("sh", str(START_SCRIPT))
        server.launcher_env = {
            "REDIS_HOST_NAME": "127.0.0.1", "REDIS_PORT": str(server.port),
            "SENTINELS": " ".join(f"127.0.0.1:{port}" for port in self.sentinel_ports),
            "SENTINEL_PASSWORD": self.sentinel_password or "", "REDIS_PASSWORD": self.password or "",
            "REDIS_MASTER_NAME": self.master_name,
        }
        return server.start()

    def wait_for_failover(self, old_port: int, timeout: float = 30) -> float:
        """Seconds until the Sentinels name a new master that answers as one."""
        started = time.monotonic()
        self._wait(lambda: self._promoted(old_port), timeout, "the Sentinels to promote a replica")
        return time.monotonic() - started

    def _promoted(self, old_port: int) -> bool:
        import redis

        port = self.master_port()
        if port in (None, old_port):
            return False
        try:
            role = redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=1).role()
        except redis.RedisError:
            return False
        return role[0] in (b"master", "master")

    def _connected_replicas(self, server: EmbeddedRedis) -> int:
        import redis

        try:
            info = redis.Redis(host="127.0.0.1", port=server.port, password=self.password).info("replication")
        except redis.RedisError:
            return 0
        return sum(1 for key, value in info.items()
                   if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")

    def _sentinels_agree(self) -> bool:
        import redis

        for index, process in enumerate(self.sentinel_processes):
            if process.poll() is not None:
                raise FleetError(f"Sentinel {index} exited: {process.stderr.read().decode(errors='replace')}")
        try:
            for index in range(len(self.sentinel_ports)):
                master = self.sentinel(index).sentinel_master(self.master_name)
                if int(master["num-other-sentinels"]) < len(self.sentinel_ports) - 1 or \
                        int(master["num-slaves"]) < self.replicas:
                    return False
        except redis.RedisError:
            return False
        return True

    @staticmethod
    def _wait(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise FleetError(f"timed out after {timeout:.0f} s waiting for {what}")

    def stop(self) -> None:
        for process in self.sentinel_processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.sentinel_processes.clear()
        for server in self.servers:
            server.cleanup()
        self.servers.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
