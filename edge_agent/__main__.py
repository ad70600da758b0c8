"""``python -m edge_agent``: serve the edge with settings from ``GKT_EDGE_*``."""

from __future__ import annotations

import logging

import uvicorn

from edge_agent.app import create_app
from edge_agent.settings import EdgeSettings


def main() -> None:
    settings = EdgeSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
