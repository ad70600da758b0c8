"""``python -m cloud_service``: serve the cloud with settings from ``GKT_CLOUD_*``."""

from __future__ import annotations

from cloud_service.app import create_app
from cloud_service.settings import CloudSettings
from shared.logs import configure_logging
from shared.serve import load_settings, serve
from shared.tls import server_options


def main() -> None:
    settings = load_settings(CloudSettings, "cloud")
    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except (RuntimeError, ValueError) as exc:  # a configuration the cloud refuses to start with
        raise SystemExit(f"gkt cloud: {exc}") from None
    tls = server_options(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    serve(app, settings.host, settings.port, settings.log_level, settings.drain_timeout_s, tls,
          tcp_user_timeout_s=settings.tcp_user_timeout_s)


if __name__ == "__main__":
    main()
