"""Mutual TLS between edge and cloud (S4) on real processes, with certificates made here by ``trustme``.

The cloud (SmolLM2) serves HTTPS and requires a client certificate from its CA. An edge holding such a
certificate gets guidance; a client without one, or with one from another CA, is refused in the handshake;
an edge with the wrong certificate falls back to its student (R4) and says so, in the answer and its log.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from gkt.launcher import Service, cloud_service, edge_service, free_port
from shared.tls import client_context
from tests.conftest import AUTH, CLIENT_AUTH, CLOUD_KEYS, EDGE_AUTH, EDGE_KEYS

SMOL_CLOUD = {"GKT_CLOUD_MODEL": "smollm2-135m-instruct", "GKT_CLOUD_N_THREADS": "1", "GKT_CLOUD_N_CTX": "1024",
              **CLOUD_KEYS}
SMOL_EDGE = {"GKT_EDGE_MODEL": "smollm2-135m-instruct", "GKT_EDGE_N_THREADS": "1", "GKT_EDGE_N_CTX": "1024",
             "GKT_EDGE_CLOUD_RETRIES": "0", **EDGE_AUTH, **EDGE_KEYS}
QUESTION = {"prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 6, "guidance_tokens": 3}


@dataclass
class Pki:
    ca: Path  # the cloud's CA (it signs the cloud's certificate and the edges')
    cert: Path  # an edge certificate from that CA
    key: Path
    other_cert: Path  # an edge certificate from an unrelated CA
    other_key: Path
    server_cert: Path
    server_key: Path


def _write(leaf: trustme.LeafCert, d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server = _write(ca.issue_cert("127.0.0.1", "localhost"), d, "cloud")
    edge = _write(ca.issue_cert("edge-1.gkt.test"), d, "edge")
    stranger = _write(other.issue_cert("edge-1.gkt.test"), d, "stranger")
    return Pki(d / "ca.pem", *edge, *stranger, *server)


def ctx(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    return client_context(str(pki.ca), str(cert) if cert else None, str(key) if key else None)


@pytest.fixture(scope="module")
def cloud(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {**SMOL_CLOUD, "GKT_CLOUD_TLS_CERT_FILE": str(pki.server_cert),
           "GKT_CLOUD_TLS_KEY_FILE": str(pki.server_key), "GKT_CLOUD_TLS_CLIENT_CA_FILE": str(pki.ca)}
    svc = cloud_service(free_port(), env, log_path=tmp_path_factory.mktemp("mtls") / "cloud.log",
                        tls=ctx(pki, pki.cert, pki.key))
    svc.start()
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


def edge_with(cloud: Service, pki: Pki, cert: Path, key: Path, log: Path) -> Service:
    env = {**SMOL_EDGE, "GKT_EDGE_CLOUD_CA_FILE": str(pki.ca), "GKT_EDGE_CLOUD_CERT_FILE": str(cert),
           "GKT_EDGE_CLOUD_KEY_FILE": str(key)}
    return edge_service(free_port(), cloud.url, env, log_path=log)


@pytest.fixture(scope="module")
def edges(cloud: Service, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    logs = tmp_path_factory.mktemp("mtls-edges")
    good = edge_with(cloud, pki, pki.cert, pki.key, logs / "good.log").start()
    bad = edge_with(cloud, pki, pki.other_cert, pki.other_key, logs / "bad.log").start()
    try:
        yield good.wait_ready(), bad.wait_ready()
    finally:
        good.stop()
        bad.stop()


def test_s4_edge_with_a_certificate_from_the_cloud_ca_gets_guidance(edges: tuple[Service, Service]) -> None:
    good, _ = edges
    assert good.url.startswith("http://")  # the edge itself serves plain HTTP on loopback; its cloud link is TLS
    r = httpx.post(good.url + "/v1/completions", json=QUESTION, headers=CLIENT_AUTH, timeout=120)
    assert r.status_code == 200, r.text
    gkt = r.json()["gkt"]
    assert gkt["fallback"] is None and gkt["teacher_model"] and gkt["usage"]["teacher_tokens"] > 0


def test_s4_client_without_a_certificate_is_refused(cloud: Service, pki: Pki) -> None:
    assert cloud.url.startswith("https://")
    body = {"prompt": "Hi", "max_tokens": 2, "stream": False}
    with pytest.raises(httpx.TransportError):  # the handshake fails: no HTTP status at all
        httpx.post(cloud.url + "/v1/guidance", json=body, headers=AUTH, timeout=30, verify=ctx(pki))
    with pytest.raises(httpx.TransportError):
        httpx.get(cloud.url + "/health", timeout=30, verify=ctx(pki, pki.other_cert, pki.other_key))
    with pytest.raises(httpx.TransportError):  # plain HTTP is not served either
        httpx.get(cloud.url.replace("https://", "http://") + "/health", timeout=30)
    # The same call with the CA's client certificate is answered (the key still decides the tenant).
    r = httpx.post(cloud.url + "/v1/guidance", json=body, headers=AUTH, timeout=60,
                   verify=ctx(pki, pki.cert, pki.key))
    assert r.status_code == 200, r.text


def test_s4_edge_with_a_foreign_certificate_falls_back_and_says_so(edges: tuple[Service, Service]) -> None:
    """R4 through S4: the cloud refuses the edge's certificate; the student answers alone, marked."""
    _, bad = edges
    r = httpx.post(bad.url + "/v1/completions", json=QUESTION, headers=CLIENT_AUTH, timeout=120)
    assert r.status_code == 200, r.text
    gkt = r.json()["gkt"]
    assert gkt["fallback"] == "upstream_unavailable" and gkt["usage"]["teacher_tokens"] == 0
    assert r.json()["choices"][0]["text"]
    assert "no guidance (upstream_unavailable)" in Path(bad.log_path).read_text()  # type: ignore[arg-type]
