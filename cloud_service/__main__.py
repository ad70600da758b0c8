"""``python -m cloud_service``: serve the cloud with settings from ``GKT_CLOUD_*``."""

from __future__ import annotations

import logging

from cloud_service.app import create_app
from cloud_service.settings import CloudSettings
from shared.serve import serve


def main() -> None:
    settings = CloudSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        app = create_app(settings)
    except (RuntimeError, ValueError) as exc:  # a configuration the cloud refuses to start with
        raise SystemExit(f"gkt cloud: {exc}") from None
    serve(app, settings.host, settings.port, settings.log_level, settings.drain_timeout_s,
          settings.tcp_user_timeout_s)


if __name__ == "__main__":
    main()
