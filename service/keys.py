"""The Redis key layout (documented in docs/keys.md).

Every key starts with the configurable prefix ``P`` (``KERNELSCOPE_KEY_PREFIX``, default ``ks``).
Keys of one run carry the hash tag ``{r:<run_id>}`` so that a Redis Cluster keeps a run's keys
in one slot (multi-key transactions and ``MGET`` over one run stay legal); the job streams carry
the tag ``{jobs}``.  Run ids and sequence ids are validated against ``ID_PATTERN`` before they
reach a key, so no input can name a key outside its own run.

=====================================  ======  ==============================================
key                                    type    content
=====================================  ======  ==============================================
``P:runs``                             zset    run ids, score = creation time (unix seconds)
``P:{r:R}:spec``                       string  the run spec, JSON (never changes)
``P:{r:R}:steps``                      zset    step numbers that have data, score = step
``P:{r:R}:summary``                    hash    step -> JSON summary of its last entropy
                                               analysis (no TTL: the run's history)
``P:{r:R}:s:S:step``                   hash    learning_rate, max_length, entropy_before/after
``P:{r:R}:s:S:seqs``                   hash    sequence id -> JSON metadata (upsert by id)
``P:{r:R}:s:S:order``                  zset    sequence id, score = first-seen position
``P:{r:R}:s:S:uploads``                hash    upload id -> JSON record (state, ids, error)
``P:{r:R}:s:S:raw:U``                  string  raw upload body (claim check, TTL raw_ttl_s)
``P:{r:R}:s:S:part:U``                 string  partial sketch of upload U, safetensors
                                               ``sketch`` [n, k] float32 + ``sequence_ids``
``P:{r:R}:s:S:version``                string  counter, INCR on any change of parts/sequences
``P:{r:R}:s:S:cache``                  hash    "<version>|<query>" -> cached result bytes
``P:{jobs}:stream``                    stream  jobs {run_id, step, upload_id, kind}; group
                                               ``workers``
``P:{jobs}:dead``                      stream  dead-lettered jobs with their error
=====================================  ======  ==============================================

**On a Redis Cluster** (``KERNELSCOPE_REDIS_CLUSTER``) a transaction must stay within one hash
slot, and an upload's transaction writes its run's keys and queues its job.  So the runs are
spread over ``Q = KERNELSCOPE_QUEUE_SHARDS`` slot tags ``{q<i>}``, ``i = crc32(run_id) mod Q``,
each with its own job and dead-letter streams, which every worker reads:

=====================================  ==================================================
one Redis                              Redis Cluster
=====================================  ==================================================
``P:{r:R}:...``                        ``P:{q<i>}:<r:R>:...`` (same suffixes)
``P:{jobs}:stream``, ``P:{jobs}:dead`` ``P:{q<i>}:stream``, ``P:{q<i>}:dead``, i < Q
``P:runs``                             ``P:runs`` (never in a transaction with run keys)
=====================================  ==================================================
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import cached_property

from sketch.names import APPLIED_UPDATE_ID as APPLIED_UPDATE_ID

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
"""Run ids and sequence ids: letters, digits and ``._:-``, 1 to 128 characters."""
ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # use fullmatch: "$" would allow a "\n"
GROUP = "workers"
"""Consumer group of the job streams (:mod:`service.queue`)."""


def check_id(value: str) -> str:
    """Return ``value`` if it is a legal run or sequence id, else raise ``ValueError``."""
    if not ID_RE.fullmatch(value):
        raise ValueError(f"invalid id {value[:140]!r}: expected {ID_PATTERN}")
    return value


@dataclass(frozen=True)
class Keys:
    """Key builder for one prefix.  Every method returns ``bytes``-safe ``str`` keys.

    ``shards``: 0 for one Redis (one job stream, a hash tag per run); ``Q > 0`` on a Redis
    Cluster (the runs spread over ``Q`` slot tags, each with its own streams; see above).
    """

    prefix: str
    shards: int = 0

    # global keys
    @property
    def runs(self) -> str:
        return f"{self.prefix}:runs"

    @cached_property
    def streams(self) -> list[str]:
        """Every job stream: the one on one Redis, one per shard on a cluster."""
        if not self.shards:
            return [f"{self.prefix}:{{jobs}}:stream"]
        return [f"{self.prefix}:{{q{i}}}:stream" for i in range(self.shards)]

    @cached_property
    def deads(self) -> list[str]:
        """Every dead-letter stream, in the order of :attr:`streams`."""
        if not self.shards:
            return [f"{self.prefix}:{{jobs}}:dead"]
        return [f"{self.prefix}:{{q{i}}}:dead" for i in range(self.shards)]

    def shard(self, run_id: str) -> int:
        """The run's shard (0 on one Redis): ``crc32(run_id) mod shards``."""
        return zlib.crc32(check_id(run_id).encode()) % self.shards if self.shards else 0

    def stream_of(self, run_id: str) -> str:
        """The job stream of the run's uploads (in the run's slot on a cluster)."""
        return self.streams[self.shard(run_id)]

    def dead_of(self, run_id: str) -> str:
        """The dead-letter stream of the run's jobs."""
        return self.deads[self.shard(run_id)]

    def dead_of_stream(self, stream: str) -> str:
        """The dead-letter stream beside the job stream ``stream``."""
        return self.deads[self.streams.index(stream)]

    # per run
    def run_base(self, run_id: str) -> str:
        if self.shards:
            return f"{self.prefix}:{{q{self.shard(run_id)}}}:<r:{run_id}>"
        return f"{self.prefix}:{{r:{check_id(run_id)}}}"

    def spec(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}:spec"

    def steps(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}:steps"

    def summary(self, run_id: str) -> str:
        return f"{self.run_base(run_id)}:summary"

    def run_pattern(self, run_id: str) -> str:
        """``SCAN MATCH`` pattern of every key of the run (the hash tag braces escaped)."""
        if self.shards:
            return f"{self.prefix}:\\{{q{self.shard(run_id)}\\}}:<r:{run_id}>:*"
        return f"{self.prefix}:\\{{r:{check_id(run_id)}\\}}:*"

    # per step
    def step_pattern(self, run_id: str, step: int) -> str:
        """``SCAN MATCH`` pattern of every key of one step of the run (not of step 10 for 1)."""
        return f"{self.run_pattern(run_id)[:-1]}s:{int(step)}:*"

    def step_base(self, run_id: str, step: int) -> str:
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return f"{self.run_base(run_id)}:s:{int(step)}"

    def step(self, run_id: str, step: int) -> str:
        return f"{self.step_base(run_id, step)}:step"

    def seqs(self, run_id: str, step: int) -> str:
        return f"{self.step_base(run_id, step)}:seqs"

    def order(self, run_id: str, step: int) -> str:
        return f"{self.step_base(run_id, step)}:order"

    def ranks(self, run_id: str, step: int) -> str:
        return f"{self.step_base(run_id, step)}:ranks"

    def uploads(self, run_id: str, step: int) -> str:
        return f"{self.step_base(run_id, step)}:uploads"

    def raw(self, run_id: str, step: int, upload_id: str) -> str:
        return f"{self.step_base(run_id, step)}:raw:{check_id(upload_id)}"

    def part(self, run_id: str, step: int, upload_id: str) -> str:
        return f"{self.step_base(run_id, step)}:part:{check_id(upload_id)}"

    def version(self, run_id: str, step: int) -> str:
        return f"{self.step_base(run_id, step)}:version"

    def cache(self, run_id: str, step: int) -> str:
        return f"{self.step_base(run_id, step)}:cache"

    def tokens(self, run_id: str, step: int) -> str:
        """The step's token shares: one field per update sequence, ``__meta__`` the push's
        estimator, target and learning rate."""
        return f"{self.step_base(run_id, step)}:tokens"
