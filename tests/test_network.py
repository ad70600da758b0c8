"""Network faults for real (N1-N5): the cloud and the edge as separate hosts in network namespaces.

One module-scoped testbed (gkt/netlab.py): an edge namespace and a cloud namespace joined by a veth pair,
the real cloud and two real edges (SmolLM2-135M everywhere, one thread each). ``edge`` talks to the cloud
over the link directly; ``edge_px`` through gkt/netproxy.py, a userspace proxy in the edge namespace that
adds delay, jitter, resets, clean closes or stalls (``tc netem`` does not exist on this kernel). Bandwidth
limits are ``tc tbf`` on the link, blackholes and resets ``nftables`` rules on the cloud host.

Outcomes are asserted; timings are printed and written to ``network-timings.json`` in the test's log
directory, never asserted (the machine is shared).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gkt import netlab as netns
from shared.words import WORD_ALLOWANCE
from tests.conftest import CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS

CLOUD_PORT, EDGE_PORT, EDGE_PX_PORT, PROXY_PORT = 8001, 8002, 8003, 9001
# Generous for a shared, busy machine: a starved cloud must not look like a broken link.
IDLE_S, GUIDANCE_S, CONNECT_S, USER_TIMEOUT_S = 5.0, 30.0, 1.0, 5.0
CLOUD_ENV = {"GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "4096",
             "GKT_CLOUD_HOST": "0.0.0.0", "GKT_CLOUD_PORT": str(CLOUD_PORT), "GKT_CLOUD_HEARTBEAT_S": "0.5",
             "GKT_CLOUD_MAX_IN_FLIGHT": "2", "GKT_CLOUD_TCP_USER_TIMEOUT_S": str(USER_TIMEOUT_S),
             "GKT_CLOUD_CACHE_MAX_ENTRIES": "0", **CLOUD_KEYS}  # no cache: every guidance is really streamed
EDGE_ENV = {"GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "4096",
            "GKT_EDGE_HOST": "0.0.0.0", "GKT_EDGE_CLOUD_READ_TIMEOUT_S": str(IDLE_S),
            "GKT_EDGE_GUIDANCE_TIMEOUT_S": str(GUIDANCE_S), "GKT_EDGE_CLOUD_CONNECT_TIMEOUT_S": str(CONNECT_S),
            "GKT_EDGE_CLOUD_RETRIES": "1", "GKT_EDGE_BREAKER_THRESHOLD": "1000", **EDGE_AUTH, **EDGE_KEYS}
# k = max_tokens: the teacher is still writing when the fault strikes; the student then finishes the rest.
# A counting prompt: the models keep going instead of ending early.
COUNT = "Count from 1 to 1000: 1, 2, 3, 4, 5,"
LONG = {"prompt": COUNT, "max_tokens": 300, "guidance_tokens": 300, "temperature": 0}
TIMINGS: dict[str, dict] = {}


@dataclass
class Bed:
    net: netns.Hosts
    cloud: netns.NetnsService
    edge: netns.NetnsService
    edge_px: netns.NetnsService
    logs: Path
    proxy: subprocess.Popen | None = None

    def start_proxy(self, *args: str) -> Path:
        """(Re)start the proxy in the edge namespace in front of the cloud; returns its log."""
        self.stop_proxy()
        log = self.logs / f"proxy-{time.monotonic_ns()}.log"
        self.proxy = self.net.proxy(PROXY_PORT, CLOUD_PORT, log, *args)
        return log

    def stop_proxy(self) -> None:
        netns.stop(self.proxy)
        self.proxy = None


def require() -> None:
    """Skip, loudly, where namespaces cannot be created."""
    reason = netns.unavailable()
    if reason:
        msg = f"NETWORK-NAMESPACE TESTS (N1-N5) SKIPPED: {reason}"
        warnings.warn(msg, stacklevel=2)
        print(f"\n{'*' * 80}\n* {msg}\n{'*' * 80}", file=sys.stderr)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    require()
    logs = tmp_path_factory.mktemp("netns")
    net = netns.Hosts().up()
    py = [sys.executable]
    cloud = netns.NetnsService("cloud", net.cloud_ns, [*py, "-m", "cloud_service"], net.cloud_mgmt_addr,
                               CLOUD_PORT, CLOUD_ENV, log_path=logs / "cloud.log")
    edge = netns.NetnsService("edge", net.edge_ns, [*py, "-m", "edge_agent"], net.edge_addr, EDGE_PORT,
                              {**EDGE_ENV, "GKT_EDGE_PORT": str(EDGE_PORT),
                               "GKT_EDGE_CLOUD_URL": f"http://{net.cloud_addr}:{CLOUD_PORT}"},
                              log_path=logs / "edge.log")
    edge_px = netns.NetnsService("edge_px", net.edge_ns, [*py, "-m", "edge_agent"], net.edge_addr, EDGE_PX_PORT,
                                 {**EDGE_ENV, "GKT_EDGE_PORT": str(EDGE_PX_PORT),
                                  "GKT_EDGE_CLOUD_URL": f"http://127.0.0.1:{PROXY_PORT}"},
                                 log_path=logs / "edge_px.log")
    b = Bed(net, cloud, edge, edge_px, logs)
    try:
        for s in (cloud, edge, edge_px):
            s.start()
        for s in (cloud, edge, edge_px):
            s.wait_ready(1800)
        yield b
    finally:
        b.stop_proxy()
        for s in (edge_px, edge, cloud):
            s.stop()
        net.down()
        logs.mkdir(parents=True, exist_ok=True)  # concurrent pytest sessions may rotate the base temp dir away
        (logs / "network-timings.json").write_text(json.dumps(TIMINGS, indent=2))
        print(f"\nN1-N5 timings ({logs / 'network-timings.json'}):\n{json.dumps(TIMINGS, indent=2)}")


@pytest.fixture(autouse=True)
def settled(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts and ends with a clean link and an idle cloud."""
    yield
    if "bed" in request.fixturenames:
        b: Bed = request.getfixturevalue("bed")
        b.net.clear_firewall()
        b.net.unlimit()
        b.net.restore()
        b.stop_proxy()
        wait_until(lambda: metric(b.cloud, "gkt_cloud_requests_in_flight") == 0, 60)


# Helpers -------------------------------------------------------------------------------------------------
def wait_until(cond: Callable[[], bool], timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def metric(svc: netns.NetnsService, name: str, labels: str = "") -> float:
    text = httpx.get(svc.url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def cloud_outcomes(cloud: netns.NetnsService) -> dict[str, float]:
    text = httpx.get(cloud.url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^gkt_cloud_requests_total\{outcome="(\w+)",route="guidance"\} (\S+)$', text, re.M)}


@dataclass
class Answer:
    info: dict = field(default_factory=dict)
    teacher_chunks: int = 0
    student_chunks: int = 0
    text: str = ""
    t_first_student: float | None = None
    t_end: float = 0.0


def stream(edge: netns.NetnsService, body: dict, on_teacher: Callable[[int], None] | None = None) -> Answer:
    """A streamed gkt completion; ``on_teacher(n)`` is called after the n-th guidance chunk arrives."""
    a = Answer()
    with httpx.stream("POST", edge.url + "/v1/completions", json={**body, "stream": True}, headers=CLIENT_AUTH,
                      timeout=httpx.Timeout(120, connect=10)) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            gkt = ev.get("gkt", {})
            if "mode" in gkt:
                a.info = gkt
            text = ev["choices"][0].get("text") if ev.get("choices") else None
            if text:
                a.text += text
                if gkt.get("source") == "teacher":
                    a.teacher_chunks += 1
                    if on_teacher:
                        on_teacher(a.teacher_chunks)
                else:
                    a.student_chunks += 1
                    if a.t_first_student is None:
                        a.t_first_student = time.monotonic()
    a.t_end = time.monotonic()
    return a


def whole(g: dict) -> bool:
    """All k guidance tokens (or the teacher's whole answer) arrived: no fallback, no partial, no error."""
    return bool(g["guidance"]) and not g["partial"] and g["fallback"] is None and g["cloud_error"] is None


def complete(edge: netns.NetnsService, body: dict) -> dict:
    r = httpx.post(edge.url + "/v1/completions", json=body, headers=CLIENT_AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def record(name: str, **figures: object) -> None:
    TIMINGS[name] = figures
    print(f"{name}: {figures}")


# N1 ------------------------------------------------------------------------------------------------------
def test_n1_latency_and_jitter_on_the_cloud_link(bed: Bed) -> None:
    """N1: 80 ms ± 40 ms each way on every chunk: answers are whole and the guidance is exactly the cloud's."""
    body = {"prompt": "Q: What is 12 * 7?\nA:", "max_tokens": 40, "guidance_tokens": 30, "temperature": 0}
    direct = complete(bed.edge, body)["gkt"]
    log = bed.start_proxy("--delay-ms", "80", "--jitter-ms", "40", "--seed", "1")
    t0 = time.monotonic()
    delayed = [complete(bed.edge_px, body)["gkt"] for _ in range(3)]
    for g in delayed:
        # Whole, and as long as on the direct link: the edge checks every frame's seq (F5), so duplicated,
        # lost or reordered frames would have ended it as a protocol error.
        assert whole(g), g
        assert g["usage"]["teacher_tokens"] == direct["usage"]["teacher_tokens"]
    bed.stop_proxy()
    assert "conn 1 ended" in log.read_text()  # the proxy really was in the path
    record("N1", direct_cloud_ttft_s=direct["timings"]["cloud_ttft_s"],
           delayed_cloud_ttft_s=[g["timings"]["cloud_ttft_s"] for g in delayed],
           delayed_guidance_s=[g["timings"]["guidance_s"] for g in delayed],
           wall_s=round(time.monotonic() - t0, 2))


# N2 ------------------------------------------------------------------------------------------------------
def test_n2_slow_link_completes(bed: Bed) -> None:
    """N2: a 24 kbit/s tbf link: the guidance trickles in (heartbeats and tokens keep it alive) and completes."""
    bed.net.limit("24kbit")
    assert "tbf" in bed.net.qdisc()
    body = {"prompt": COUNT, "max_tokens": 70, "guidance_tokens": 60, "temperature": 0}
    rss0 = rss_kb(bed.cloud.proc.pid)
    g = complete(bed.edge, body)["gkt"]
    assert whole(g), g
    assert 60 <= g["usage"]["teacher_tokens"] <= 60 + WORD_ALLOWANCE + 1  # k, then the rest of the word
    bed.net.unlimit()
    fast = complete(bed.edge, body)["gkt"]
    record("N2 slow link", rate="24kbit", guidance_s=g["timings"]["guidance_s"],
           unlimited_guidance_s=fast["timings"]["guidance_s"],
           cloud_rss_growth_kb=rss_kb(bed.cloud.proc.pid) - rss0)


def slow_read(host: str, port: int, body: dict, chunk: int = 256, pause: float = 0.02) -> tuple[bytes, float]:
    """A client with a 4 KiB receive buffer that reads 256 bytes every 20 ms: the server must wait for it."""
    payload = json.dumps(body).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, port))
    auth = "".join(f"{k}: {v}\r\n" for k, v in CLIENT_AUTH.items())
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
              f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
    data, t0 = b"", time.monotonic()
    s.settimeout(60)
    while True:
        got = s.recv(chunk)
        if not got:
            break
        data += got
        time.sleep(pause)
    s.close()
    return data, time.monotonic() - t0


def test_n2_slow_reader_completes_with_bounded_memory(bed: Bed) -> None:
    """N2: the edge streams 400 tokens into a reader slower than the student; it completes; memory stays flat."""
    body = {"prompt": COUNT, "max_tokens": 400, "guidance_tokens": 20, "stream": True, "temperature": 0}
    pid = bed.edge.proc.pid
    rss0, fds0 = rss_kb(pid), fds(pid)
    data, took = slow_read(bed.net.edge_addr, EDGE_PORT, body)
    assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data
    assert re.search(rb'"partial": ?false', data) and re.search(rb'"fallback": ?null', data)
    assert len(data) > 20_000  # hundreds of tokens, far more than the reader's buffer
    growth = rss_kb(pid) - rss0
    assert growth < 64 * 1024, f"edge RSS grew {growth} kB for one slow reader"
    wait_until(lambda: fds(pid) <= fds0, 10)
    record("N2 slow reader", bytes=len(data), read_s=round(took, 2), edge_rss_growth_kb=growth)


# N3 ------------------------------------------------------------------------------------------------------
def test_n3_link_cut_mid_stream(bed: Bed) -> None:
    """N3: the link goes down during the guidance. The edge notices within its idle timeout and the student
    finishes from the partial guidance (marked). The cloud hears nothing (no FIN, no RST): its engine must
    still come free, at the latest at the budget the edge sent it, instead of waiting on the dead socket."""
    before = cloud_outcomes(bed.cloud)
    cut_at: list[float] = []

    def cut(n: int) -> None:
        if n == 5:
            bed.net.cut()
            cut_at.append(time.monotonic())

    a = stream(bed.edge, LONG, on_teacher=cut)
    assert cut_at, "the guidance never started"
    info = a.info
    assert info["partial"] and info["fallback"] is None and info["partial_reason"] == "timeout", info
    assert info["guidance"] and a.student_chunks > 0
    noticed = a.t_first_student - cut_at[0]
    stopped = wait_until(lambda: metric(bed.cloud, "gkt_cloud_requests_in_flight") == 0, 60) + a.t_end - cut_at[0]
    after = cloud_outcomes(bed.cloud)
    changed = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    # One outcome for the one request: "ok" when it wrote all k tokens into its socket buffers before
    # they filled, "error" (timeout) when the budget stopped it, "cancelled" if the disconnect was seen.
    assert sum(changed.values()) == 1 and set(changed) <= {"ok", "error", "cancelled"}, changed
    assert metric(bed.cloud, "gkt_cloud_engine_sequences") == 0
    # The socket too: the kernel aborts it after GKT_CLOUD_TCP_USER_TIMEOUT_S without acknowledgements,
    # instead of retransmitting into the cut link for about 15 minutes (found by this test).
    wait_until(lambda: not bed.net.stuck_on_link(CLOUD_PORT), 60)
    released = time.monotonic() - cut_at[0]
    bed.net.restore()
    # Recovery is judged once the link carries traffic again (the kernel needs up to a second after the
    # link comes up); the edge must not keep anything from the dead link (a pooled connection, the breaker).
    wait_until(lambda: bed.net.carries(CLOUD_PORT), 30)
    again = complete(bed.edge, {"prompt": "Hi", "max_tokens": 8, "guidance_tokens": 4})["gkt"]
    assert whole(again), again  # whole guidance: not partial, no fallback, no cloud error
    record("N3 link cut", idle_timeout_s=IDLE_S, guidance_budget_s=GUIDANCE_S,
           edge_noticed_after_s=round(noticed, 2), cloud_engine_stopped_after_s=round(stopped, 2),
           cloud_socket_released_after_s=round(released, 2), tcp_user_timeout_s=USER_TIMEOUT_S,
           cloud_outcome=changed, guidance_chunks_kept=a.teacher_chunks)


# N4 ------------------------------------------------------------------------------------------------------
def fault_mid_stream(bed: Bed, edge: netns.NetnsService, inject: Callable[[], None]) -> tuple[Answer, float]:
    at: list[float] = []

    def go(n: int) -> None:
        if n == 5:
            inject()
            at.append(time.monotonic())

    a = stream(edge, LONG, on_teacher=go)
    return a, (a.t_first_student or a.t_end) - (at[0] if at else a.t_end)


@pytest.mark.parametrize("fault", ["blackhole", "reset", "proxy_reset", "clean_close", "proxy_stall"])
def test_n4_mid_stream_faults(bed: Bed, fault: str) -> None:
    """N4 mid-stream: every fault leaves a partial guidance the student finishes; the reason tells which.

    blackhole (nft drop) and a stall are only noticed by the idle timeout; a reset (nft reject with tcp reset,
    or the proxy aborting) and a clean close (FIN without a terminal frame) are noticed at once."""
    edge = bed.edge
    if fault == "blackhole":
        inject = lambda: bed.net.firewall(CLOUD_PORT, "drop")  # noqa: E731
    elif fault == "reset":
        inject = lambda: bed.net.firewall(CLOUD_PORT, "reject with tcp reset")  # noqa: E731
    else:
        then = {"proxy_reset": "reset", "clean_close": "close", "proxy_stall": "stall"}[fault]
        bed.start_proxy("--after-bytes", "1500", "--then", then)
        edge, inject = bed.edge_px, (lambda: None)
    a, noticed = fault_mid_stream(bed, edge, inject)
    info = a.info
    expected = {"blackhole": "timeout", "proxy_stall": "timeout"}.get(fault)
    assert info["partial"] and info["fallback"] is None and a.student_chunks > 0, info
    if expected:
        assert info["partial_reason"] == expected, info
    else:
        assert info["partial_reason"] != "timeout", info
    record(f"N4 mid-stream {fault}", partial_reason=info["partial_reason"], cloud_error=info["cloud_error"],
           noticed_after_s=round(noticed, 2), guidance_chunks_kept=a.teacher_chunks)


@pytest.mark.parametrize("fault", ["blackhole", "reset"])
def test_n4_faults_before_the_first_frame(bed: Bed, fault: str) -> None:
    """N4 on a new connection: a blackhole costs the connect timeout per attempt, a reset is refused at once;
    either way the student answers alone and says so (T3, R4)."""
    bed.net.firewall(CLOUD_PORT, "drop" if fault == "blackhole" else "reject with tcp reset")
    t0 = time.monotonic()
    g = complete(bed.edge, {"prompt": "Hi there", "max_tokens": 8, "guidance_tokens": 4})["gkt"]
    took = time.monotonic() - t0
    expected = {"blackhole": "timeout", "reset": "upstream_unavailable"}[fault]
    assert g["fallback"] == expected and not g["partial"] and g["guidance"] == "", g
    counters = bed.net.counters()
    record(f"N4 new connection {fault}", fallback=g["fallback"], cloud_error=g["cloud_error"],
           answered_after_s=round(took, 2), guidance_s=g["timings"]["guidance_s"],
           connect_timeout_s=CONNECT_S, attempts=2)
    assert "drop" in counters or "reject" in counters


# N5 ------------------------------------------------------------------------------------------------------
class Loris:
    """``n`` connections that send a request line and then one header byte every second, never finishing;
    half of them finish the headers and trickle a body instead."""

    def __init__(self, host: str, port: int, n: int) -> None:
        self.socks: list[socket.socket] = []
        for i in range(n):
            s = socket.create_connection((host, port), timeout=5)
            if i % 2:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100000\r\n\r\n{")
            else:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-a: ")
            self.socks.append(s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        while not self._stop.wait(1.0):
            for s in self.socks:
                try:
                    s.send(b"a")
                except OSError:
                    pass

    def alive(self) -> int:
        n = 0
        for s in self.socks:
            try:
                s.send(b"a")
                n += 1
            except OSError:
                pass
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks:
            s.close()


def test_n5_slow_loris_does_not_starve_real_requests(bed: Bed) -> None:
    """N5: 200 slow-loris connections on the edge and 200 on the cloud; real gkt answers still flow; the
    connections' file descriptors are released when they go."""
    epid, cpid = bed.edge.proc.pid, bed.cloud.proc.pid
    e_fds0, c_fds0 = fds(epid), fds(cpid)
    loris = [Loris(bed.net.edge_addr, EDGE_PORT, 200), Loris(bed.net.cloud_mgmt_addr, CLOUD_PORT, 200)]
    try:
        time.sleep(2)
        held = (fds(epid) - e_fds0, fds(cpid) - c_fds0)
        t0 = time.monotonic()
        answers = [complete(bed.edge, {"prompt": f"Q: What is {i} + {i}?\nA:", "max_tokens": 16,
                                       "guidance_tokens": 8})["gkt"] for i in range(3)]
        took = time.monotonic() - t0
        for g in answers:
            assert whole(g), g
        alive = [lo.alive() for lo in loris]
    finally:
        for lo in loris:
            lo.close()
    wait_until(lambda: fds(epid) <= e_fds0 + 2 and fds(cpid) <= c_fds0 + 2, 20)
    record("N5 slow loris", loris_per_service=200, fds_held=held, loris_still_open=alive,
           three_real_answers_s=round(took, 2))
