"""Hosts in network namespaces: an edge host and a cloud host joined by a veth pair (the network tests N1-N5,
the bench's ``links`` section).

Topology (addresses from a per-run /24 in 10.0.0.0/8 so parallel runs do not collide)::

    this process (root ns) --mgmt veth-- edge ns --cloud link veth-- cloud ns --mgmt veth-- this process

The cloud link is the only path between edge and cloud: cutting it, limiting it with ``tc tbf`` or adding
nftables rules to it affects exactly the edge-cloud traffic, never this process's own access to either host.
Needs root and ``ip`` (iproute2); ``tc`` to shape the link and ``nft`` to filter it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gkt.launcher import Service


def _run(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can (checked by really making one)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc", "nft") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (`make system-deps` installs iproute2 and nftables)"
    probe = f"gktprobe{os.getpid()}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def sweep() -> None:
    """Remove what an earlier run killed before its cleanup left: namespaces (and the processes in them)
    named after a process that no longer exists."""
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        m = re.match(r"gkt(\d+)[ec]\b", line)
        if not m or Path(f"/proc/{m.group(1)}").exists():
            continue
        ns = line.split()[0]
        for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run("ip", "netns", "del", ns, check=False)
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+: (gkt(\d+)m[ec])[@:]", line)
        if m and not Path(f"/proc/{m.group(2)}").exists():
            _run("ip", "link", "del", m.group(1), check=False)


class NetnsService(Service):
    """A service process run inside a namespace, reached at ``host`` (its management address)."""

    def __init__(self, name: str, ns: str, argv: list[str], host: str, port: int,
                 env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        super().__init__(name, ["ip", "netns", "exec", ns, *argv], port, env, log_path=log_path)
        self.host = host

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Hosts:
    """Two namespaces, ``edge`` and ``cloud``, a cloud link between them and a management link to each."""

    def __init__(self) -> None:
        tag = str(os.getpid())  # interface names stay within 15 characters
        net = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.edge_ns, self.cloud_ns = f"gkt{tag}e", f"gkt{tag}c"
        self.edge_if, self.cloud_if = f"gkt{tag}ce", f"gkt{tag}cc"  # the cloud link's two ends
        self.edge_link_addr, self.cloud_addr = f"{net}.1", f"{net}.2"  # cloud link
        self.edge_addr, self.cloud_mgmt_addr = f"{net}.6", f"{net}.10"  # what this process dials
        self._mgmt = [(f"gkt{tag}me", f"gkt{tag}mE", self.edge_ns, f"{net}.5", self.edge_addr),
                      (f"gkt{tag}mc", f"gkt{tag}mC", self.cloud_ns, f"{net}.9", self.cloud_mgmt_addr)]

    def up(self) -> Hosts:
        sweep()
        for ns in (self.edge_ns, self.cloud_ns):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", self.edge_if, "netns", self.edge_ns, "type", "veth",
             "peer", "name", self.cloud_if, "netns", self.cloud_ns)
        _run("ip", "-n", self.edge_ns, "addr", "add", f"{self.edge_link_addr}/30", "dev", self.edge_if)
        _run("ip", "-n", self.cloud_ns, "addr", "add", f"{self.cloud_addr}/30", "dev", self.cloud_if)
        self.restore()
        for root_if, ns_if, ns, root_addr, ns_addr in self._mgmt:
            _run("ip", "link", "add", root_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
            _run("ip", "addr", "add", f"{root_addr}/30", "dev", root_if)
            _run("ip", "link", "set", root_if, "up")
            _run("ip", "-n", ns, "addr", "add", f"{ns_addr}/30", "dev", ns_if)
            _run("ip", "-n", ns, "link", "set", ns_if, "up")
        return self

    def down(self) -> None:
        """Deleting a namespace deletes its veth ends, and with them their peers in the root namespace."""
        for ns in (self.edge_ns, self.cloud_ns):
            _run("ip", "netns", "del", ns, check=False)
        for root_if, *_ in self._mgmt:
            _run("ip", "link", "del", root_if, check=False)

    # The proxy on the edge host -------------------------------------------------------------------------
    def proxy(self, listen_port: int, target_port: int, log: Path, *args: str,
              timeout_s: float = 30.0) -> subprocess.Popen[bytes]:
        """gkt/netproxy.py in the edge namespace, on 127.0.0.1:``listen_port`` in front of the cloud's
        ``target_port``, with its fault or delay ``args``; returned once it listens (its output in ``log``)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.edge_ns, sys.executable, "-m", "gkt.netproxy", "--listen",
             f"127.0.0.1:{listen_port}", "--target", f"{self.cloud_addr}:{target_port}", *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while "listening" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"the proxy did not start (log: {log})")
            time.sleep(0.1)
        return proc

    # The cloud link ---------------------------------------------------------------------------------------
    def cut(self) -> None:
        """Take the cloud link down at the edge's end: packets stop, no FIN or RST reaches either side."""
        _run("ip", "-n", self.edge_ns, "link", "set", self.edge_if, "down")

    def restore(self) -> None:
        _run("ip", "-n", self.edge_ns, "link", "set", self.edge_if, "up")
        _run("ip", "-n", self.cloud_ns, "link", "set", self.cloud_if, "up")

    def carries(self, port: int, timeout_s: float = 0.5) -> bool:
        """Whether a TCP connection from the edge host to the cloud's ``port`` opens over the cloud link now.
        A link set up again does not carry traffic at once: the kernel's link watch activates the device's
        queue up to a second later, and ARP must resolve the peer again."""
        code = f"import socket; socket.create_connection(({self.cloud_addr!r}, {port}), {timeout_s}).close()"
        return _run("ip", "netns", "exec", self.edge_ns, sys.executable, "-c", code, check=False).returncode == 0

    def limit(self, rate: str, burst: str = "4kb", latency: str = "2s") -> None:
        """A ``tc tbf`` bandwidth limit on both directions of the cloud link."""
        for ns, dev in ((self.edge_ns, self.edge_if), (self.cloud_ns, self.cloud_if)):
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", rate, "burst", burst, "latency", latency)

    def unlimit(self) -> None:
        for ns, dev in ((self.edge_ns, self.edge_if), (self.cloud_ns, self.cloud_if)):
            _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)

    def qdisc(self) -> str:
        return _run("tc", "-n", self.cloud_ns, "qdisc", "show", "dev", self.cloud_if).stdout

    def nft(self, ns: str, script: str) -> None:
        _run("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=script)

    def firewall(self, port: int, verdict: str) -> None:
        """nftables on the cloud host for the cloud link: ``drop`` (blackhole) or ``reject with tcp reset``.

        Only traffic arriving over the cloud link is matched, so the management access keeps working.
        """
        out = "drop" if verdict == "drop" else "accept"
        self.nft(self.cloud_ns, f"""
            table inet gkt_fault {{
                chain input {{
                    type filter hook input priority 0; iifname "{self.cloud_if}" tcp dport {port} counter {verdict};
                }}
                chain output {{
                    type filter hook output priority 0; oifname "{self.cloud_if}" tcp sport {port} counter {out};
                }}
            }}""")

    def clear_firewall(self) -> None:
        _run("ip", "netns", "exec", self.cloud_ns, "nft", "delete", "table", "inet", "gkt_fault", check=False)

    def stuck_on_link(self, port: int) -> list[str]:
        """The cloud's connections to the edge over the cloud link that hold undelivered data (Send-Q > 0)."""
        out = _run("ip", "netns", "exec", self.cloud_ns, "ss", "-Htn", "sport", "=", f":{port}").stdout
        return [line for line in out.splitlines()
                if len(f := line.split()) >= 5 and f[4].startswith(f"{self.edge_link_addr}:") and int(f[2]) > 0]

    def counters(self) -> str:
        return _run("ip", "netns", "exec", self.cloud_ns, "nft", "list", "ruleset").stdout


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """End a process this module started (a proxy), if it still runs."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(10)
