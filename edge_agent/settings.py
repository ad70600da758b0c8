"""Edge settings, read from ``GKT_EDGE_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.models import DEFAULT_STUDENT
from shared.tasks import PromptStyle
from shared.tls import check_files


class EdgeSettings(BaseSettings):
    """Configuration of the edge agent (env prefix ``GKT_EDGE_``)."""

    model_config = SettingsConfigDict(env_prefix="GKT_EDGE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8002, ge=0, le=65535, description="Bind port.")
    model: str = Field(DEFAULT_STUDENT, description="Student: registry model name or GGUF path.")
    n_ctx: int = Field(4096, ge=256, le=131072, description="Student context size in tokens.")
    n_threads: int = Field(1, ge=1, le=256, description="Student threads for prompt and generation.")
    n_batch: int = Field(512, ge=16, le=8192, description="Student prompt batch size.")
    max_waiting: int = Field(
        16, ge=0, le=4096, description="Requests that may wait for the student; more are refused at once (503)."
    )
    adapter: str | None = Field(
        None, description="A LoRA adapter to load with the student: its GGUF or its manifest (`NAME.gguf.json`, "
        "whose base model sha256 must be the student's; a bare GGUF is checked by llama.cpp's architecture and "
        "shape checks only).",
    )
    adapter_scale: float = Field(1.0, ge=0, le=16, description="Scale of the LoRA adapter's contribution.")
    follow_adapter: str | None = Field(
        None, description="Follow this adapter at the cloud (`GET /v1/adapters`): fetch each new version, check "
        "it and swap it in between generations.",
    )
    adapter_poll_s: float = Field(60.0, gt=0, le=86400, description="How often a followed adapter is checked.")
    adapter_dir: str | None = Field(
        None, description="Where followed adapters are stored (default `~/.cache/gkt/adapters`)."
    )
    cloud_url: str = Field("http://127.0.0.1:8001", description="Base URL of the gkt cloud.")
    cloud_connect_timeout_s: float = Field(3.0, gt=0, le=120, description="Connect timeout to the cloud.")
    cloud_read_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest silence on a guidance stream (heartbeats count as traffic)."
    )
    guidance_timeout_s: float = Field(
        60.0, gt=0, le=3600,
        description="Overall deadline for the guidance phase; the cloud is sent the remaining budget as `timeout_ms`.",
    )
    cloud_retries: int = Field(
        2, ge=0, le=10, description="Retries of a guidance request before its first frame, on retryable errors only."
    )
    cloud_retry_base_s: float = Field(
        0.2, gt=0, le=60, description="First retry backoff (doubles each retry, jittered to [d/2, d])."
    )
    cloud_retry_cap_s: float = Field(
        2.0, gt=0, le=300, description="Longest retry backoff; a cloud asking (Retry-After) for more is not retried."
    )
    breaker_threshold: int = Field(5, ge=1, le=1000, description="Consecutive cloud failures that open the breaker.")
    breaker_cooldown_s: float = Field(
        10.0, gt=0, le=3600,
        description="How long an open breaker sends every request straight to the student before one probe.",
    )
    tcp_user_timeout_s: float = Field(
        30.0, ge=0, le=3600,
        description="Abort a client connection whose sent data stays unacknowledged this long (a vanished client, "
        "N3; 0 leaves TCP's default of about 15 minutes).",
    )
    drain_timeout_s: float = Field(
        20.0, gt=0, le=3600,
        description="SIGTERM: how long running answers may finish before open streams end with an error event.",
    )
    stall_timeout_s: float = Field(
        300.0, gt=0, le=86400,
        description="A busy student with no token for this long makes readiness fail (`engine stalled`).",
    )
    auth: bool = Field(
        True, description="Require a client API key on every route except /health, /ready and /metrics."
    )
    api_keys: str = Field(
        "", description="Client keys as comma-separated `name:sha256hex` entries (hashes only; `gkt keys new NAME` "
        "makes a key and its entry; `gkt up` pairs one).",
    )
    rate_limit_per_min: float = Field(600.0, gt=0, description="Answer requests per minute per client key (refill).")
    rate_limit_burst: int = Field(
        60, ge=1, description="Answer requests a key may make at once before the rate applies."
    )
    cloud_api_key: SecretStr | None = Field(
        None, description="This edge's key at the cloud (sent as a bearer token); `gkt up` makes one."
    )
    price_student_per_mtok: float = Field(
        0.0, ge=0, description="Student price per million tokens (prompt, guidance and generated)."
    )
    price_cpu_per_hour: float = Field(0.01, ge=0, description="Student price per CPU-core hour of engine time.")
    default_mode: Literal["gkt", "student", "teacher"] = Field("gkt", description="Mode when a request names none.")
    task_prompt: PromptStyle = Field(
        "few_shot", description="The student's prompt for a request that names a `task`: the exemplars, or one "
        "instruction line (`zero_shot`, ~30 tokens instead of ~750 on GSM8K; what `gkt distill` trains adapters "
        "on, docs/DISTILL.md).",
    )
    teacher_task_prompt: PromptStyle = Field(
        "few_shot", description="The teacher's prompt for the same request (gkt and teacher modes). The guidance "
        "continues the student's prompt whichever the teacher read; the exemplars keep the teacher's answers short "
        "and in the answer format, and the cloud keeps their prefix cached.",
    )
    default_guidance_tokens: int = Field(40, ge=1, le=8192, description="k when a request names none.")
    default_max_tokens: int = Field(
        512, ge=1, le=131072, description="Answer length when a request names none (clamped to the context)."
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=1 << 30, description="Larger request bodies get 413.")
    fast_path: bool = Field(
        True, description="Prefill the student's prompt and the arriving guidance while the guidance streams "
        "(docs/BENCHMARKS.md)."
    )
    cloud_ca_file: str | None = Field(
        None, description="Verify an https cloud against this CA (PEM) instead of the system store."
    )
    cloud_cert_file: str | None = Field(
        None, description="Mutual TLS: the certificate chain (PEM) this edge presents to the cloud."
    )
    cloud_key_file: str | None = Field(None, description="Mutual TLS: the private key of `cloud_cert_file` (PEM).")
    telemetry: bool = Field(
        True, description="Push each answer's record (tokens, times, cost, fallbacks) to the cloud "
        "(`POST /v1/telemetry/answers`), for edges nobody can scrape; the cloud's `/v1/usage` and Grafana show them.",
    )
    telemetry_dir: str | None = Field(
        None, description="Where the outbox of undelivered records lives (`outbox-<port>.sqlite3`). Default: "
        "`$XDG_CACHE_HOME/gkt/telemetry`.",
    )
    telemetry_max_records: int = Field(
        100_000, ge=1, le=100_000_000,
        description="Outbox bound; when full the OLDEST records are dropped (`gkt_edge_telemetry_dropped_total`).",
    )
    telemetry_batch: int = Field(200, ge=1, le=500, description="Records per telemetry request.")
    telemetry_interval_s: float = Field(
        5.0, gt=0, le=3600, description="Longest a record waits before it is sent (a full batch goes at once)."
    )
    telemetry_retry_cap_s: float = Field(
        60.0, gt=0, le=3600, description="Longest backoff between deliveries while the cloud is away (jittered "
        "exponential from 1 s; records wait on disk meanwhile).",
    )
    telemetry_flush_timeout_s: float = Field(
        5.0, ge=0, le=600, description="Shutdown: how long the remaining records may take to reach the cloud; "
        "the rest stay in the outbox for the next start.",
    )
    log_level: str = Field(
        "info", description="Python log level (every line of a request carries its request id)."
    )

    @model_validator(mode="after")
    def _tls_complete(self) -> EdgeSettings:
        if (self.cloud_cert_file is None) != (self.cloud_key_file is None):
            raise ValueError("GKT_EDGE_CLOUD_CERT_FILE and GKT_EDGE_CLOUD_KEY_FILE go together")
        check_files(GKT_EDGE_CLOUD_CA_FILE=self.cloud_ca_file, GKT_EDGE_CLOUD_CERT_FILE=self.cloud_cert_file,
                    GKT_EDGE_CLOUD_KEY_FILE=self.cloud_key_file)
        return self
