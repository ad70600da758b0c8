"""The load run through the balancer, 1 replica against 2 (`gkt bench cluster`), at a small size (K5):
every request is answered or refused with Retry-After, none lost, one ledger row per answer. The published
figures come from the full-size command in docs/RELIABILITY.md on a quiet machine; no speed is asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gkt.backing import Redis
from gkt.cli import main
from gkt.cluster import Haproxy

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(not (Haproxy.available() and Redis.available()),
                       reason="haproxy or redis-server missing: make system-deps"),
]


def test_load_through_the_balancer_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exited:
        main(["bench", "cluster", "--clients", "3", "--seconds", "6", "--max-tokens", "4", "--out", str(out)])
    code = exited.value.code
    results = json.loads(out.read_text())
    for run in results["runs"].values():
        assert run["sent"] == run["answered"] + run["refused"] + run["lost"]
        assert run["lost"] == 0 and run["answered"] > 0, run
        assert run["ledger_rows"] == run["answered"]
    assert code == 0 and results["speedup_2_over_1"] is not None
