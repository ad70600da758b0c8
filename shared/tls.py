"""Optional mutual TLS between edge and cloud (S4).

The cloud serves HTTPS with ``GKT_CLOUD_TLS_CERT_FILE``/``_KEY_FILE``; with ``GKT_CLOUD_TLS_CLIENT_CA_FILE``
it also requires every client (edge) to present a certificate signed by that CA, checked during the
handshake, before any HTTP is read. The edge verifies the cloud against ``GKT_EDGE_CLOUD_CA_FILE`` (else the
system store) and presents ``GKT_EDGE_CLOUD_CERT_FILE``/``_KEY_FILE``. API keys still apply on top: a
certificate says which machine calls, the key which tenant is billed.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def check_files(**files: str | None) -> None:
    """Every named file that is set must exist (a typo should stop the start, not every request)."""
    for name, path in files.items():
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{name}: no such file: {path}")


def server_options(cert_file: str | None, key_file: str | None, client_ca_file: str | None) -> dict[str, Any]:
    """uvicorn ``Config`` keyword arguments: none for plain HTTP; HTTPS; or HTTPS requiring client certificates."""
    if cert_file is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": cert_file, "ssl_keyfile": key_file}
    if client_ca_file is not None:
        options |= {"ssl_ca_certs": client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def client_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """What a client of a TLS server verifies (``ca_file``, else the system store) and presents (its cert)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx
