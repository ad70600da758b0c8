"""``python -m edge_agent``: serve the edge with settings from ``GKT_EDGE_*``."""

from __future__ import annotations

from edge_agent.app import create_app
from edge_agent.settings import EdgeSettings
from shared.logs import configure_logging
from shared.serve import load_settings, serve


def main() -> None:
    settings = load_settings(EdgeSettings, "edge")
    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except (RuntimeError, ValueError) as exc:  # a configuration the edge refuses to start with (S6)
        raise SystemExit(f"gkt edge: {exc}") from None
    serve(app, settings.host, settings.port, settings.log_level, settings.drain_timeout_s,
          tcp_user_timeout_s=settings.tcp_user_timeout_s)


if __name__ == "__main__":
    main()
