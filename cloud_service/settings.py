"""Cloud settings, read from ``GKT_CLOUD_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.models import DEFAULT_TEACHER
from shared.tls import check_files


class CloudSettings(BaseSettings):
    """Configuration of the cloud service (env prefix ``GKT_CLOUD_``)."""

    model_config = SettingsConfigDict(env_prefix="GKT_CLOUD_", extra="ignore")

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8001, ge=0, le=65535, description="Bind port.")
    backend: Literal["llama_cpp", "openai"] = Field(
        "llama_cpp",
        description="Teacher engine: `llama_cpp` (in process) or `openai` (an OpenAI-compatible upstream such as "
        "`vllm serve`, or a hosted API).",
    )
    adapter_dir: str | None = Field(
        None, description="LoRA adapters served to edges (`NAME.gguf` with its `NAME.gguf.json` manifest); "
        "unset: `GET /v1/adapters` lists none.",
    )
    model: str = Field(DEFAULT_TEACHER, description="llama_cpp: registry model name or GGUF path.")
    n_ctx: int = Field(4096, ge=256, le=131072, description="llama_cpp: context size in tokens.")
    n_threads: int = Field(
        1, ge=1, le=256,
        description="llama_cpp: threads for prompt and generation; one per model when teacher and student share a "
        "machine (two models at once on two cores thrash).",
    )
    n_batch: int = Field(512, ge=16, le=8192, description="llama_cpp: prompt batch size.")
    flash_attn: Literal["off", "on", "auto"] = Field(
        "off",
        description="llama_cpp: flash attention in the batched context. Off, as llama-cpp-python's Llama and the "
        "edge: on this CPU, auto (which turns it on) decoded one sequence about 10 % slower (docs/BENCHMARKS.md).",
    )
    max_in_flight: int = Field(
        8, ge=1, le=256,
        description="Guidance sequences generated at once: llama_cpp batch slots (each with its own n_ctx KV "
        "cache, sharing every decode step); openai: concurrent upstream requests.",
    )
    max_waiting: int = Field(
        16, ge=0, le=4096, description="Requests that may wait for a free slot; more are refused at once (503)."
    )
    queue_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="Longest wait for a slot; then 503 and the request never reaches the engine. Keep it below "
        "the edges' read timeout.",
    )
    auth: bool = Field(
        True, description="Require an edge API key on every route except /health, /ready and /metrics."
    )
    api_keys: str = Field(
        "", description="Edge keys as comma-separated `name:sha256hex` entries (hashes only; `gkt keys new NAME` "
        "makes a key and its entry).",
    )
    rate_limit_per_min: float = Field(600.0, gt=0, description="Guidance requests per minute per key (refill rate).")
    rate_limit_burst: int = Field(60, ge=1, description="Requests a key may make at once before the rate applies.")
    redis_url: SecretStr | None = Field(
        None, description="Share the per-key rate limits of every replica in this Redis (`redis://host:port/db`); "
        "unset: each process limits on its own (one replica).",
    )
    rate_limit_on_outage: Literal["open", "closed"] = Field(
        "open", description="Redis unreachable: `open` limits each replica on its own until it is back (nobody is "
        "refused for the outage), `closed` refuses guidance with 503 `store_unavailable` (hard quotas).",
    )
    database_url: SecretStr | None = Field(
        None, description="The ledger's database, a SQLAlchemy URL: `sqlite:///path` or "
        "`postgresql://user:password@host:port/db` (asyncpg). Default: SQLite in the cache directory "
        "(`$XDG_CACHE_HOME/gkt/ledger.sqlite3`). Migrated (Alembic) at start-up.",
    )
    database_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Longest a ledger write or query may take; then the database counts as down "
        "(not ready) and the answer ends with an error frame instead of an unbilled done frame.",
    )
    fleet_viewers: str = Field(
        "", description="Key names (comma-separated; `*` for every key) whose `/v1/usage` shows every edge's "
        "reported answers and the fleet's totals; any other key sees its own edge's only.",
    )
    cache_max_entries: int = Field(1024, ge=0, description="Guidance cache entries (0 turns the cache off).")
    cache_max_bytes: int = Field(16 * 2**20, ge=0, description="Guidance cache size bound in bytes of text.")
    price_input_per_mtok: float = Field(0.50, ge=0, description="Teacher price per million prompt tokens.")
    price_cached_input_per_mtok: float = Field(
        0.05, ge=0, description="Teacher price per million prompt tokens found in its KV cache (reused, not "
        "computed again): a tenth of the default input price, as providers bill cached input.",
    )
    price_output_per_mtok: float = Field(1.50, ge=0, description="Teacher price per million guidance tokens.")
    price_accelerator_per_hour: float = Field(
        0.0, ge=0, description="Teacher price per accelerator hour of engine time (on top of token prices)."
    )
    currency: str = Field("USD", description="Currency of the prices.")
    upstream_url: str = Field(
        "http://127.0.0.1:8000/v1", description="openai: base URL of the upstream (e.g. `vllm serve`)."
    )
    upstream_model: str | None = Field(
        None, description="openai: model name sent upstream (default: the first of its /models)."
    )
    upstream_api_key: SecretStr | None = Field(None, description="openai: bearer key for the upstream.")
    upstream_structured: Literal["response_format", "grammar"] = Field(
        "response_format", description="openai: how structured output travels upstream: the OpenAI "
        "response_format field (vLLM's structured outputs, hosted APIs), or the GBNF grammar itself in a "
        "`grammar` field (llama.cpp's servers; the guidance then follows exactly the edge's grammar).",
    )
    upstream_connect_timeout_s: float = Field(5.0, gt=0, le=300, description="openai: connect timeout.")
    upstream_read_timeout_s: float = Field(120.0, gt=0, le=3600, description="openai: per-read timeout.")
    max_guidance_tokens: int = Field(2048, ge=1, le=32768, description="Upper bound on k per request.")
    request_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="Longest a guidance request may run (a caller's timeout_ms can shorten it)."
    )
    drain_timeout_s: float = Field(
        20.0, gt=0, le=3600,
        description="SIGTERM: how long running work may finish before open streams end with an error frame.",
    )
    stall_timeout_s: float = Field(
        300.0, gt=0, le=86400,
        description="A busy engine with no token for this long makes readiness fail (`engine stalled`).",
    )
    tcp_user_timeout_s: float = Field(
        30.0, ge=0, le=3600,
        description="Abort a client connection whose sent data stays unacknowledged this long (a cut link, N3; "
        "0 leaves TCP's default of about 15 minutes).",
    )
    heartbeat_s: float = Field(5.0, gt=0, le=300, description="Heartbeat frame interval on idle streams.")
    batch_concurrency: int = Field(8, ge=1, le=256, description="Batch items generated at the same time.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=1 << 30, description="Larger request bodies get 413.")
    tls_cert_file: str | None = Field(None, description="Serve HTTPS with this certificate chain (PEM).")
    tls_key_file: str | None = Field(None, description="The private key of `tls_cert_file` (PEM).")
    tls_client_ca_file: str | None = Field(
        None, description="Mutual TLS: require every client (edge) to present a certificate signed by this CA (PEM)."
    )
    log_level: str = Field(
        "info", description="Python log level (every line of a request carries its request id)."
    )

    @model_validator(mode="after")
    def _tls_complete(self) -> CloudSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("GKT_CLOUD_TLS_CERT_FILE and GKT_CLOUD_TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("GKT_CLOUD_TLS_CLIENT_CA_FILE needs HTTPS (GKT_CLOUD_TLS_CERT_FILE and _KEY_FILE)")
        check_files(GKT_CLOUD_TLS_CERT_FILE=self.tls_cert_file, GKT_CLOUD_TLS_KEY_FILE=self.tls_key_file,
                    GKT_CLOUD_TLS_CLIENT_CA_FILE=self.tls_client_ca_file)
        return self
