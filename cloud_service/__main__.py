"""``python -m cloud_service``: serve the cloud with settings from ``GKT_CLOUD_*``."""

from __future__ import annotations

import logging

import uvicorn

from cloud_service.app import create_app
from cloud_service.settings import CloudSettings


def main() -> None:
    settings = CloudSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        app = create_app(settings)
    except (RuntimeError, ValueError) as exc:  # a configuration the cloud refuses to start with
        raise SystemExit(f"gkt cloud: {exc}") from None
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
