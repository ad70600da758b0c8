"""``gkt testbed``: cloud, edge and a real Prometheus as local processes, for machines without Docker.

Prometheus gets the same scrape config as the compose file (``gkt.observability.prometheus_config``), with
the targets pointed at the local ports. With ``--remote-write`` the edge's metrics travel as a fleet's do
(``gkt/remote_write.py``): an agent-mode Prometheus scrapes the edge and pushes to the central one.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from gkt.launcher import (
    CLIENT_KEY_FILE,
    DEFAULT_KEY_FILE,
    Service,
    cloud_service,
    edge_service,
    free_port,
    local_auth_env,
    until_one_exits,
)
from gkt.observability import prometheus_config
from gkt.remote_write import agent_service, central_service


def prometheus_service(port: int, targets: dict[str, str], workdir: Path, scrape_interval: str = "5s",
                       log_path: Path | None = None) -> Service:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (Debian: apt-get install prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(prometheus_config(targets, scrape_interval))
    argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    return Service("prometheus", argv, port, ready_path="/-/ready", log_path=log_path)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testbed", help="run cloud, edge and Prometheus locally until interrupted")
    p.add_argument("--cloud-port", type=int, default=8001)
    p.add_argument("--edge-port", type=int, default=8002)
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--scrape-interval", default="5s")
    p.add_argument("--remote-write", action="store_true",
                   help="as a fleet: Prometheus in agent mode scrapes the edge and pushes to a central Prometheus "
                   "(remote-write receiver on --prometheus-port) that scrapes the cloud")
    p.add_argument("--edge-name", default="local", help="with --remote-write: the edge label of its series")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="gkt-testbed-"))
    cloud_env, edge_env = local_auth_env(DEFAULT_KEY_FILE, CLIENT_KEY_FILE)  # paired like `gkt up`
    cloud = cloud_service(args.cloud_port, cloud_env).start()
    edge = edge_service(args.edge_port, cloud.url, edge_env).start()
    targets = {"gkt-cloud": f"127.0.0.1:{args.cloud_port}", "gkt-edge": f"127.0.0.1:{args.edge_port}"}
    if args.remote_write:
        prom = central_service(args.prometheus_port, [targets["gkt-cloud"]], work / "central", args.scrape_interval)
        agent = agent_service(free_port(), targets["gkt-edge"], f"http://127.0.0.1:{args.prometheus_port}/api/v1/write",
                              args.edge_name, work / "agent", args.scrape_interval)
        prom.start()
        proms = [agent.start(), prom]  # stopped in this order: the agent's last push still lands
    else:
        prom = prometheus_service(args.prometheus_port, targets, work, args.scrape_interval).start()
        proms = [prom]
    services = [edge, cloud, *proms]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # through `finally`: no Prometheus left orphaned
    try:
        for s in (*proms, cloud, edge):
            s.wait_ready()
        print(f"""
gkt testbed is up (Ctrl-C stops it):
  cloud {cloud.url}/metrics   edge {edge.url}/metrics   prometheus {prom.url} (data in {work})
  try: .venv/bin/gkt ask "What is 17 * 3?" (it sends the client key kept in {CLIENT_KEY_FILE})
  then query {prom.url}/graph?g0.expr=gkt_edge_requests_total
  Grafana (where installed): provision deploy/grafana/provisioning and point the datasource at {prom.url}
""", flush=True)
        return until_one_exits(services, "a service exited; stopping")
    except KeyboardInterrupt:
        return 0
    finally:
        for s in services:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
