"""Private Redis and PostgreSQL instances on loopback ephemeral ports (``gkt cluster``, tests, load runs).

Each runs from the Debian package's binaries (``make system-deps`` installs them) with its data in a
directory of its own, and is never a service that happens to be running on the machine. PostgreSQL refuses
to run as root, so as root the cluster is initialised and run as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path

from gkt.launcher import free_port


def _wait_port(port: int, proc: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


class Backing(ABC):
    """A server process with a data directory; ``kill()`` is ``kill -9``, ``start()`` runs it again on the same
    port and data (a restart)."""

    name = "backing"

    def __init__(self, data: Path, port: int | None = None) -> None:
        self.data = data
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @abstractmethod
    def argv(self) -> list[str]:
        """The server's command line (each kind of server says its own)."""

    def user(self) -> str | None:
        return None

    def start(self) -> Backing:
        self.data.mkdir(parents=True, exist_ok=True)
        log = open(self.data / f"{self.name}.log", "ab")
        user = self.user()
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.data,
                                     user=user, start_new_session=True)
        log.close()
        _wait_port(self.port, self.proc, self.name)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Backing:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Redis(Backing):
    """``redis-server`` with no persistence (rate-limit windows are short-lived by nature)."""

    name = "redis"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.data), "--protected-mode", "yes"]


def pg_bin(tool: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian)."""
    if found := shutil.which(tool):
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


class Postgres(Backing):
    """A throwaway PostgreSQL cluster (``initdb`` into ``data``, trust auth on loopback only)."""

    name = "postgres"

    @staticmethod
    def available() -> bool:
        return pg_bin("initdb") is not None and pg_bin("postgres") is not None

    def user(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None  # it refuses to run as root

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cluster(self) -> Path:
        return self.data / "pg"

    def start(self) -> Backing:
        cluster = self._cluster()
        if not (cluster / "PG_VERSION").exists():
            self.data.mkdir(parents=True, exist_ok=True)
            if (user := self.user()) is not None:
                pw = pwd.getpwnam(user)
                os.chown(self.data, pw.pw_uid, pw.pw_gid)
            subprocess.run([pg_bin("initdb"), "-D", str(cluster), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                            "--no-sync"], check=True, capture_output=True, user=self.user())
        super().start()
        # Listening is not accepting: after a crash the server replays its WAL first ("starting up").
        deadline = time.monotonic() + 60
        while subprocess.run([pg_bin("pg_isready") or "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                             check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres on port {self.port} not accepting connections")
            time.sleep(0.1)
        return self

    def argv(self) -> list[str]:
        return [pg_bin("postgres") or "postgres", "-D", str(self._cluster()), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", str(self.data), "-c", "fsync=on"]
