"""LoRA adapters: the manifest checks, the cloud's shelf, and the student serving with an adapter (real SmolLM2
with a tiny adapter written in the test by ``tests/lora_gguf.py``; the delivery between processes is in
``tests/test_adapter_delivery.py``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from cloud_service.app import create_app as create_cloud
from cloud_service.settings import CloudSettings
from edge_agent.adapters import startup_adapter
from edge_agent.app import create_app as create_edge
from edge_agent.settings import EdgeSettings
from edge_agent.student import LlamaEngine
from gkt.launcher import free_port
from shared.adapters import AdapterError, AdapterRef, locate, sha256_file, verify
from shared.auth import key_entry, new_key
from shared.generation import GenerationParams, GenerationResult, Piece
from shared.models import REGISTRY, resolve
from tests.conftest import CLIENT_AUTH, EDGE_KEYS
from tests.lora_gguf import publish, write_lora

MODEL = "smollm2-135m-instruct"
BASE_SHA = REGISTRY[MODEL].sha256
OTHER_SHA = REGISTRY["qwen2.5-coder-0.5b-instruct"].sha256
KEY = new_key()
PROMPT = "Q: Tom has 3 boxes of 4 pens. How many pens does he have?\nA: Tom has"


@pytest.fixture(scope="module")
def shelf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shelf")
    publish(write_lora(resolve(MODEL), d / "good.gguf", seed=1), "good", MODEL, BASE_SHA)
    publish(write_lora(resolve(MODEL), d / "other.gguf", seed=2), "other", "qwen", OTHER_SHA)
    bad = write_lora(resolve(MODEL), d / "bad.gguf", seed=3)
    publish(bad, "bad", MODEL, BASE_SHA, sha256="0" * 64)
    (d / "broken.gguf.json").write_text("{not json")
    publish(write_lora(resolve(MODEL), d / "gone.gguf", seed=4), "gone", MODEL, BASE_SHA)
    (d / "gone.gguf").unlink()
    return d


# --- no model ---------------------------------------------------------------------------------------------


def test_manifest_checks_say_why(shelf: Path) -> None:
    gguf, manifest = locate(shelf / "good.gguf")  # the GGUF finds its manifest beside it
    assert manifest is not None and manifest.name == "good"
    assert verify(gguf, manifest, BASE_SHA) == sha256_file(gguf)
    assert locate(shelf / "good.gguf.json") == (gguf, manifest)
    with pytest.raises(AdapterError, match="not on the loaded student") as err:
        verify(*locate(shelf / "other.gguf.json"), BASE_SHA)
    assert err.value.reason == "mismatch"
    with pytest.raises(AdapterError, match="corrupt or partial") as err:
        verify(*locate(shelf / "bad.gguf.json"), BASE_SHA)
    assert err.value.reason == "corrupt"
    with pytest.raises(AdapterError, match="broken.gguf.json: not a readable adapter manifest") as err:
        locate(shelf / "broken.gguf.json")
    assert err.value.reason == "invalid"
    with pytest.raises(AdapterError, match="does not exist"):
        startup_adapter(str(shelf / "gone.gguf.json"), BASE_SHA, 1.0)
    path, ref = startup_adapter(str(shelf / "good.gguf"), BASE_SHA, 0.5)
    assert (path, ref.name, ref.sha256, ref.scale, ref.base_model) == (gguf, "good", manifest.sha256, 0.5, MODEL)


def test_edge_refuses_to_start_with_a_mismatched_adapter(shelf: Path, tmp_path: Path) -> None:
    """A real ``python -m edge_agent`` told to load an adapter of another base stops at start, saying why
    (before it loads the model: the registry knows the student's sha256)."""
    env = {**os.environ, "GKT_EDGE_MODEL": MODEL, "GKT_EDGE_PORT": str(free_port()), **EDGE_KEYS,
           "GKT_EDGE_ADAPTER": str(shelf / "other.gguf.json")}
    proc = subprocess.run([sys.executable, "-m", "edge_agent"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "adapter other was trained on qwen" in proc.stderr and "not on the loaded student" in proc.stderr


@pytest.fixture
async def cloud(shelf: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The cloud's app in process, lifespan not run: the adapter routes need no teacher, only the real auth."""
    app = create_cloud(CloudSettings(api_keys=key_entry("edge", KEY), adapter_dir=str(shelf)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://cloud") as client:
        yield client


async def test_cloud_lists_and_serves_adapters_to_keyed_edges_only(cloud: httpx.AsyncClient, shelf: Path) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/v1/adapters", "/v1/adapters/good"):
        r = await cloud.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert (await cloud.get(path, headers={"Authorization": f"Bearer {new_key()}"})).status_code == 401
    listing = (await cloud.get("/v1/adapters", headers=auth)).json()["data"]
    # "broken" (no manifest) and "gone" (no file) are skipped; "bad" is listed: only the edge can tell.
    assert [a["name"] for a in listing] == ["bad", "good", "other"]
    good = next(a for a in listing if a["name"] == "good")
    assert good == {"name": "good", "sha256": sha256_file(shelf / "good.gguf"),
                    "size": (shelf / "good.gguf").stat().st_size,
                    "base_model": {"name": MODEL, "sha256": BASE_SHA}}
    r = await cloud.get("/v1/adapters/good", headers=auth)
    assert r.status_code == 200 and r.content == (shelf / "good.gguf").read_bytes()
    assert r.headers["x-adapter-sha256"] == good["sha256"]
    for name in ("nope", "gone", "..%2Fgood.gguf", "broken"):
        r = await cloud.get(f"/v1/adapters/{name}", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", name


# --- the real student ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(shelf: Path) -> Iterator[tuple[LlamaEngine, LlamaEngine]]:
    ref = AdapterRef(name="good", sha256=sha256_file(shelf / "good.gguf"), scale=1.0, base_model=MODEL)
    base = LlamaEngine(resolve(MODEL), n_ctx=512, n_threads=1, name=MODEL)
    tuned = LlamaEngine(resolve(MODEL), n_ctx=512, n_threads=1, name=MODEL, lora_path=shelf / "good.gguf",
                        adapter=ref)
    yield base, tuned
    tuned.close()
    base.close()


async def _logprobs(engine: LlamaEngine, n: int = 8) -> tuple[str, list[float]]:
    text, lps = "", []
    async for item in engine.stream(engine.tokenize(PROMPT, special=False), GenerationParams(n, logprobs=True)):
        if isinstance(item, Piece):
            text += item.text
            lps += item.logprobs or []
        assert isinstance(item, Piece | GenerationResult)
    return text, lps


async def test_the_adapter_changes_the_students_logprobs(engines: tuple[LlamaEngine, LlamaEngine]) -> None:
    base, tuned = engines
    (text_a, lp_a), (text_b, lp_b) = await _logprobs(base), await _logprobs(tuned)
    assert (await _logprobs(base))[1] == lp_a  # greedy and deterministic: the difference is the adapter's
    assert len(lp_a) == len(lp_b) == 8
    assert text_a != text_b or max(abs(a - b) for a, b in zip(lp_a, lp_b, strict=True)) > 1e-3


async def test_edge_reports_its_adapter(engines: tuple[LlamaEngine, LlamaEngine]) -> None:
    """``/v1/models``, the ``gkt`` object, ``/ready`` and ``gkt_edge_adapter_info`` name the adapter."""
    _, tuned = engines
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}")  # no cloud: student mode only
    app = create_edge(EdgeSettings(n_ctx=512, **{"api_keys": EDGE_KEYS["GKT_EDGE_API_KEYS"]}), student=tuned,
                      http=http)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://edge", timeout=120
    ) as client:
        ref = tuned.adapter
        assert ref is not None
        model = (await client.get("/v1/models", headers=CLIENT_AUTH)).json()["data"][0]
        assert model["id"] == MODEL and model["adapter"] == ref.model_dump()
        r = await client.post("/v1/completions", headers=CLIENT_AUTH,
                              json={"prompt": PROMPT, "max_tokens": 4, "mode": "student"})
        assert r.json()["gkt"]["adapter"] == ref.model_dump()
        ready = (await client.get("/ready")).json()
        assert ready["adapter"]["sha256"] == ref.sha256 and ready["adapter_problem"] is None
        metrics = (await client.get("/metrics")).text
        assert f'gkt_edge_adapter_info{{name="good",sha256="{ref.sha256}"}} 1.0' in metrics
    await http.aclose()
    await asyncio.sleep(0)
