"""Start services as separate processes and wait until they are ready (``gkt up``, tests, benchmarks)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gkt.supervise import Supervisor

DEFAULT_KEY_FILE = Path.home() / ".cache" / "gkt" / "local-edge.key"  # the local edge's key at the cloud
CLIENT_KEY_FILE = Path.home() / ".cache" / "gkt" / "edge-client.key"  # a client's key at the local edge


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One server process on loopback, ready when ``ready_path`` answers 200 (over HTTPS with ``tls``: what
    the probe verifies and presents)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        env: dict[str, str] | None = None,
        ready_path: str = "/ready",
        log_path: Path | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.name, self.argv, self.port, self.ready_path = name, argv, port, ready_path
        self.tls = tls
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def exit_code(self) -> int | None:
        """The process's exit status once it has exited (None while it runs or before it started)."""
        return None if self.proc is None else self.proc.poll()

    def is_ready(self) -> bool:
        """One readiness probe (``ready_path`` answers 200)."""
        try:
            return httpx.get(self.url + self.ready_path, timeout=2.0, verify=self.tls or True).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> Service:
        out = None
        if self._log is not None:
            self._log.close()  # a restart: the new process appends to the same log
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None)
        return self

    def wait_ready(self, timeout: float = 900.0) -> Service:
        # Generous: on a shared machine a niced test process may get a few percent of a core while it loads
        # its model; a process that exits is noticed at once anyway.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}{self._log_hint()}")
            if self.is_ready():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s{self._log_hint()}")

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if self._log:
                self._log.close()


def cloud_service(port: int, env: dict[str, str] | None = None, log_path: Path | None = None,
                  tls: ssl.SSLContext | None = None) -> Service:
    return Service("cloud", [sys.executable, "-m", "cloud_service"], port,
                   {"GKT_CLOUD_PORT": str(port), **(env or {})}, log_path=log_path, tls=tls)


def edge_service(port: int, cloud_url: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> Service:
    return Service("edge", [sys.executable, "-m", "edge_agent"], port,
                   {"GKT_EDGE_PORT": str(port), "GKT_EDGE_CLOUD_URL": cloud_url, **(env or {})}, log_path=log_path)


def until_one_exits(services: list[Service], what: str) -> int:
    """Block while every service runs; when one exits, say so (``what``) and return 1. Ctrl-C: 0. The caller
    stops the rest (its ``finally``). For the foreground commands that do not supervise (testbed, agent)."""
    try:
        while all(s.proc and s.proc.poll() is None for s in services):
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    print(what, file=sys.stderr)
    return 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run the cloud and the edge locally until interrupted")
    p.add_argument("--cloud-port", type=int, default=int(os.environ.get("GKT_CLOUD_PORT", 8001)))
    p.add_argument("--edge-port", type=int, default=int(os.environ.get("GKT_EDGE_PORT", 8002)))
    p.add_argument("--key-file", type=Path, default=DEFAULT_KEY_FILE,
                   help="where the generated key of the local edge is written (to call the cloud directly)")
    p.add_argument("--client-key-file", type=Path, default=CLIENT_KEY_FILE,
                   help="where the key for calling the edge is kept (`gkt ask` reads it from there)")
    p.set_defaults(func=run)


def _auth_off(prefix: str) -> bool:
    return os.environ.get(f"{prefix}AUTH", "true").strip().lower() in ("0", "false", "off", "no", "n", "f")


def _write_secret(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")


def read_key(path: Path) -> str | None:
    """The key kept in ``path``, if there is one."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def local_key_env(key_file: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Cloud and edge environment that pair them with a fresh key, unless keys are configured already.

    The key is written to ``key_file`` (mode 0600) so the user can call the cloud directly; only its hash
    is given to the cloud.
    """
    from shared.auth import key_entry, new_key

    if os.environ.get("GKT_CLOUD_API_KEYS") or _auth_off("GKT_CLOUD_"):
        return {}, {}
    key = os.environ.get("GKT_EDGE_CLOUD_API_KEY") or new_key()
    _write_secret(key_file, key)
    return {"GKT_CLOUD_API_KEYS": key_entry("local-edge", key)}, {"GKT_EDGE_CLOUD_API_KEY": key}


def client_key_env(key_file: Path) -> dict[str, str]:
    """Edge environment that accepts one local client key, unless client keys are configured or auth is off.

    The key is kept in ``key_file`` (mode 0600, reused across runs so scripts keep working; ``gkt ask`` reads
    it); only its hash is given to the edge.
    """
    from shared.auth import key_entry, new_key

    if os.environ.get("GKT_EDGE_API_KEYS") or _auth_off("GKT_EDGE_"):
        return {}
    key = os.environ.get("GKT_EDGE_API_KEY") or read_key(key_file) or new_key()
    _write_secret(key_file, key)
    return {"GKT_EDGE_API_KEYS": key_entry("local-client", key)}


def local_auth_env(edge_key_file: Path, client_key_file: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Cloud and edge environment of a local pair: edge paired with the cloud, a client key for the edge."""
    cloud_env, edge_env = local_key_env(edge_key_file)
    return cloud_env, {**edge_env, **client_key_env(client_key_file)}


class OperatorStop(BaseException):  # not an Exception: no broad handler on the way may swallow it
    """The operator asked a launcher (``gkt up``, ``gkt cluster``) to stop: SIGINT or SIGTERM."""


def _stop(signum: int, frame: object) -> None:
    raise OperatorStop


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise ``OperatorStop``, also when SIGINT came in ignored (a background job): Ctrl-C
    on `make run` reaches the services too, and one of them exiting first must not read as a crash."""
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)


def run(args: argparse.Namespace) -> int:
    """Start both, then supervise: a service that exits is restarted with backoff while the other keeps
    serving (the edge answers alone while the cloud is away); only the operator's signal (Ctrl-C, SIGTERM)
    stops ``gkt up``, with exit 0. A service that fails before it was ever ready is a configuration problem:
    exit 1 at once."""
    stop_on_signals()
    cloud_env, edge_env = local_auth_env(args.key_file, args.client_key_file)
    cloud = cloud_service(args.cloud_port, cloud_env)
    edge = edge_service(args.edge_port, cloud.url, edge_env)
    services = [edge, cloud]  # stopped in this order: the edge first
    try:
        cloud.start()
        edge.start()
        try:
            cloud.wait_ready()
            edge.wait_ready()
        except (RuntimeError, TimeoutError) as exc:
            print(f"gkt up: {exc}; stopping", file=sys.stderr)
            return 1
        print(_banner(cloud.url, edge.url, args.key_file if cloud_env else None,
                      args.client_key_file if "GKT_EDGE_API_KEYS" in edge_env else None), flush=True)
        Supervisor([cloud, edge]).run()
        return 0
    except OperatorStop:
        return 0
    finally:
        # A second Ctrl-C reaches the services themselves (they stop at once); here it must not cut the
        # cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for s in services:
            s.stop()


def _banner(cloud: str, edge: str, key_file: Path | None, client_key_file: Path | None) -> str:
    auth = f" -H \"Authorization: Bearer $(cat {key_file})\"" if key_file else ""
    client = f" -H \"Authorization: Bearer $(cat {client_key_file})\"" if client_key_file else ""
    where = (f"The edge wants a client key: it is in {client_key_file} (`gkt ask` reads it from there; other "
             f"clients: export GKT_EDGE_API_KEY=$(cat {client_key_file}) or pass it as the OpenAI api_key).\n"
             if client_key_file else "")
    return f"""
gkt is up: cloud (teacher) {cloud}, edge (student) {edge}. Ctrl-C stops both.
{where}
  .venv/bin/gkt ask "Natalia sold clips to 48 of her friends in April, and then she sold half as many \\
clips in May. How many clips did Natalia sell altogether in April and May?" --task gsm8k

  curl -s {edge}/v1/chat/completions -H 'Content-Type: application/json'{client} \\
    -d '{{"messages": [{{"role": "user", "content": "Why is the sky blue?"}}],
         "max_tokens": 80, "guidance_tokens": 20}}'

  curl -sN {cloud}/v1/guidance -H 'Content-Type: application/json'{auth} \\
    -d '{{"prompt": "Q: What is 12 * 7?\\nA:", "max_tokens": 10}}'
"""
