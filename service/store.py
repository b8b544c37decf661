"""Redis store of runs, steps, uploads, partial sketches and summaries (``redis.asyncio``).

The key layout is in :mod:`service.keys` and docs/keys.md.  The client must be binary-safe
(``decode_responses=False``): raw uploads and partial sketches are safetensors bytes.

Invariants the rest of the service relies on:

* an upload is stored with one MULTI/EXEC, so a failure leaves nothing half-stored: on the
  claim check raw body + upload record + its job, queued by :class:`service.queue.Queue`
  (its raw key is WATCHed so two identical uploads racing each other store one, and
  different uploads of a step never make each other retry); sketched on receipt, its part +
  its record, done, in the transaction that finishes a job (:meth:`Store.accept_upload`
  chooses the path);
* a job's result (its partial sketch or its failure) is stored in one transaction with the
  job's acknowledgement (the queue's "pessimistic execution");
* a partial sketch is keyed by its upload id (the ``Idempotency-Key`` or the body hash):
  writing it twice writes the same value, so re-sent uploads and re-delivered jobs never
  count twice;
* every change of the data an analysis reads (sequences, parts, realized entropies) bumps the
  step's ``version`` in the same transaction, and cached results are keyed by that version.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import anyio.to_thread
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.connection import Encoder, PythonRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, WatchError

from service.keys import APPLIED_UPDATE_ID, Keys
from service.queue import Job, Queue
from service.settings import Settings
from sketch.token_mean import Target

log = logging.getLogger("kernelscope.store")

UPLOAD_QUEUED = "queued"
UPLOAD_DONE = "done"
UPLOAD_FAILED = "failed"
#: Arguments longer than this are sent to the socket on their own, uncopied (redis-py's
#: default cutoff).
BULK_BUFFER_CUTOFF = 6000

# Upsert sequences by id, keep first-seen order, update step fields, bump the version, drop
# the cache: one atomic script (the order position depends on what is already stored).
_UPSERT_SEQUENCES = """
local n = redis.call('ZCARD', KEYS[2])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if redis.call('ZADD', KEYS[2], 'NX', n, ARGV[i]) == 1 then n = n + 1 end
end
redis.call('HSET', KEYS[3], 'learning_rate', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], 'max_length', ARGV[2]) end
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[3])
redis.call('SADD', KEYS[7], ARGV[4])
redis.call('INCR', KEYS[4])
redis.call('UNLINK', KEYS[5])
return redis.call('HLEN', KEYS[1])
"""


def _text(value: Any) -> str:
    """A reply of the binary client as ``str`` (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


#: The token-shares hash's field holding the shares' estimator, target and learning rate.
TOKENS_META = "__meta__"


class TokenMetaConflictError(Exception):
    """A token-shares push names another estimator, target or learning rate than the step's
    stored shares (``stored``)."""

    def __init__(self, stored: Mapping[str, Any]) -> None:
        super().__init__(f"the step holds token shares of {dict(stored)}")
        self.stored = dict(stored)


def _summary_field(step: int, target: str) -> str:
    """The summary hash's field of a step: the step for the sequence entropy (the history's
    original layout), ``step:target`` for another target."""
    return str(step) if target == "sequence" else f"{step}:{target}"


def _upload_record(
    upload_id: str, kind: str, ids: list[str], body: bytes | bytearray
) -> dict[str, Any]:
    """A new upload's record (state queued), kept in the step's ``uploads`` hash."""
    return {
        "upload_id": upload_id,
        "kind": kind,
        "ids": ids,
        "rows": len(ids),
        "state": UPLOAD_QUEUED,
        "error": None,
        "attempts": 0,
        "bytes": len(body),
        "created_at": time.time(),
    }


def _dumps(value: Any) -> bytes:
    """Compact JSON bytes.  Key order is kept: the declared ``parameters`` order is the column
    layout of the ``exact`` kind."""
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(frozen=True)
class UploadReceipt:
    """What :meth:`Store.accept_upload` did: ``new`` when this call stored the upload (False: a
    re-send of one stored already), ``sketched`` when the upload is stored as its part
    (sketched on receipt: nothing queued, the answer is 201) rather than queued (202)."""

    new: bool
    sketched: bool


@dataclass
class StepSnapshot:
    """Everything stored for one step, read in one transaction (a consistent version).

    ``parts`` maps upload id -> partial-sketch bytes for uploads in state ``done``.
    """

    version: int
    step_fields: dict[str, str]
    order: list[str]
    sequences: dict[str, dict[str, Any]]
    uploads: dict[str, dict[str, Any]]
    parts: dict[str, bytes] = field(default_factory=dict)


@dataclass
class StepCounts:
    """The step status numbers (see ``StepStatus`` in service.schemas)."""

    exists: bool
    sequences: int
    rows: int
    pending_uploads: int
    uploads: int
    applied_update: bool
    learning_rate: float | None
    errors: list[dict[str, Any]]
    ranks_expected: int = 1
    ranks_reported: list[int] = field(default_factory=list)
    token_sequences: int = 0

    @property
    def ranks_missing(self) -> int:
        """Ranks that have not posted their sequences yet.  With one rank, any sequences
        count (steps stored before ranks were recorded have none)."""
        if self.ranks_expected == 1:
            return 0 if self.sequences else 1
        return self.ranks_expected - len(self.ranks_reported)

    @property
    def state(self) -> str:
        """``pending`` / ``failed`` / ``ready`` as documented in docs/api.md."""
        if self.pending_uploads:
            return "pending"
        if self.errors:
            return "failed"
        if self.sequences and self.rows and not self.ranks_missing:
            return "ready"
        return "pending"


def bulk_client(url: str, timeout_s: float | None = None) -> SyncRedis:
    """A blocking client for upload bodies (``Store(bulk=...)``), used from worker threads.

    Replies are parsed by hiredis when it is installed (a 16 MB value in about half the
    time of redis-py's Python parser), but commands are always packed by redis-py's Python
    serializer: it hands a large value to the socket as it is, where the hiredis packer
    first copies it twice (``bytes(bytearray)`` and the packed command), which was about a
    third of the API's CPU time per upload.
    """
    encoder = Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=False)
    return SyncRedis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        command_packer=PythonRespSerializer(BULK_BUFFER_CUTOFF, encoder.encode),
    )


#: What a Redis that is down, restarting or unreachable raises (a cluster client's failure to
#: find any node is not a RedisError): the API answers 503, a worker waits and retries.
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)


def _unlink(pipe: Any, key: str) -> None:
    """Queue ``UNLINK key`` in a transaction.  Through ``execute_command`` because redis-py's
    asyncio ``ClusterPipeline.unlink`` is a coroutine (its other commands queue at once), so
    ``pipe.unlink(key)`` would be silently dropped on a cluster."""
    pipe.execute_command("UNLINK", key)


def _ignoring_keys(callback: Any) -> Any:
    """``callback`` without the ``keys`` option, which redis-py (8.1) passes to every response
    callback of a cluster transaction, where some (``SMEMBERS``, ``ZSCORE``, ...) take none."""

    def call(response: Any, **options: Any) -> Any:
        options.pop("keys", None)
        return callback(response, **options)

    return call


class _ClusterConnection(Connection):
    """A cluster node connection that reports a socket closed by the server as the
    ``ConnectionError`` it is.  On uvloop, writing to such a socket raises ``RuntimeError
    ('... the handler is closed')`` (uvloop issue 506; asyncio's own loop lets the next read
    fail instead), and redis-py's cluster client retries and re-routes on ``ConnectionError``
    only: a restarted master would otherwise fail every command sent on its old connections.
    (A single-node pool checks each connection as it lends it, so it never sends on one.)"""

    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        try:
            await super()._send_packed_command(command)
        except RuntimeError as exc:
            if "handler is closed" not in str(exc):
                raise
            raise RedisConnectionError(
                f"connection to {self.host}:{self.port} closed by the server"
            ) from exc


def connect(settings: Settings, read_slack_s: float = 0.0) -> tuple[Redis, SyncRedis | None]:
    """The asyncio client of ``settings.redis_url`` and its blocking ``bulk`` twin.

    Every command is bounded by ``redis_timeout_s`` (plus ``read_slack_s``: a worker's
    blocking reads wait ``worker_block_ms`` on top), so that a Redis that stops answering
    gives an error instead of a hang.  With ``redis_cluster`` the client is a
    ``RedisCluster`` (it speaks the same commands; a transaction must stay in one slot,
    which the sharded key layout ensures) and there is no ``bulk`` client: bodies go
    through the asyncio client, at the cost of the copies ``bulk_client`` avoids.
    """
    if not settings.redis_url:
        raise RuntimeError("no Redis configured: set REDIS_URL")
    timeout = settings.redis_timeout_s
    if settings.redis_cluster:
        cluster = RedisCluster.from_url(
            settings.redis_url,
            decode_responses=False,
            socket_connect_timeout=timeout,
            socket_timeout=timeout + read_slack_s,
        )
        for name, callback in list(cluster.response_callbacks.items()):
            cluster.response_callbacks[name] = _ignoring_keys(callback)
        # RedisCluster takes no connection class; nodes are made from these kwargs (the ones
        # discovered later) or were made already (the seed), before any connection exists.
        cluster.nodes_manager.connection_kwargs["connection_class"] = _ClusterConnection
        for node in cluster.nodes_manager.startup_nodes.values():
            node.connection_class = _ClusterConnection
        # Not a subclass of Redis, but the same command interface for everything Store does.
        return cast(Redis, cluster), None
    redis = Redis.from_url(
        settings.redis_url,
        decode_responses=False,
        socket_connect_timeout=timeout,
        socket_timeout=timeout + read_slack_s,
    )
    return redis, bulk_client(settings.redis_url, timeout)


class Store:
    """All Redis access of the API and the workers."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        raw_ttl_s: int = 86400,
        cache_ttl_s: int = 3600,
        bulk: SyncRedis | None = None,
        dead_max: int = 10_000,
        shards: int = 0,
    ):
        """``bulk``: an optional blocking client of the same Redis, used (in a worker thread)
        to write upload bodies without copying them and to read them back; without it
        everything uses ``redis``.  ``dead_max``: entries the dead-letter stream keeps.
        ``shards``: 0 on one Redis, the queue shards on a Redis Cluster (:class:`Keys`).
        ``queue``: the job queue of this key layout (the API enqueues, workers consume)."""
        self.redis = redis
        self.bulk = bulk
        self.keys = Keys(prefix, shards)
        self.queue = Queue(redis, self.keys, dead_max)
        self.raw_ttl_s = raw_ttl_s
        self.cache_ttl_s = cache_ttl_s
        self._upsert = redis.register_script(_UPSERT_SEQUENCES)

    # ------------------------------------------------------------------ runs
    async def create_run(self, run: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Store ``run`` unless its id exists.  Returns ``(stored run, created)``.

        ``created`` is False when a run with this id already exists; the caller compares
        specs (a different spec is a 409).
        """
        run_id = str(run["run_id"])
        created = await self.redis.set(self.keys.spec(run_id), _dumps(dict(run)), nx=True)
        if created:
            await self.redis.zadd(self.keys.runs, {run_id: float(run["created_at"])})
            return dict(run), True
        existing = await self.get_run(run_id)
        if existing is None:  # deleted in between: try once more
            return await self.create_run(run)
        return existing, False

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The stored run spec, or None."""
        raw = await self.redis.get(self.keys.spec(run_id))
        return None if raw is None else dict(json.loads(raw))

    async def list_runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first."""
        ids = [_text(i) for i in await self.redis.zrange(self.keys.runs, 0, -1)]
        if not ids:
            return []
        # One GET per run: the spec keys live in different hash slots (no MGET on a cluster).
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in ids:
                pipe.get(self.keys.spec(run_id))
            specs = await pipe.execute()
        return [json.loads(s) for s in specs if s is not None]

    async def delete_run(self, run_id: str) -> bool:
        """UNLINK every key of the run; False if it did not exist.  Queued jobs of the run
        are dropped by the workers (their upload record is gone)."""
        existed = await self.redis.exists(self.keys.spec(run_id))
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=self.keys.run_pattern(run_id), count=500):
            batch.append(key)
            if len(batch) >= 500:
                await self.redis.unlink(*batch)
                batch = []
        if batch:
            await self.redis.unlink(*batch)
        await self.redis.zrem(self.keys.runs, run_id)
        return bool(existed)

    # ----------------------------------------------------------------- steps
    async def delete_step(self, run_id: str, step: int) -> bool:
        """UNLINK every key of one step and its entropy summaries; False if the step had no
        data.  A worker finishing an upload of the step meanwhile stores nothing (its commit
        WATCHes the upload's raw body, :meth:`_finish`)."""
        existed = await self.redis.zscore(self.keys.steps(run_id), str(step)) is not None
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(
            match=self.keys.step_pattern(run_id, step), count=500
        ):
            batch.append(key)
            existed = True
            if len(batch) >= 500:
                await self.redis.unlink(*batch)
                batch = []
        if batch:
            await self.redis.unlink(*batch)
        fields = [_summary_field(step, target.value) for target in Target]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.steps(run_id), str(step))
            pipe.hdel(self.keys.summary(run_id), *fields)
            await pipe.execute()
        return existed

    async def list_steps(self, run_id: str) -> list[int]:
        """Step numbers of the run, ascending."""
        return [int(_text(s)) for s in await self.redis.zrange(self.keys.steps(run_id), 0, -1)]

    async def upsert_sequences(
        self,
        run_id: str,
        step: int,
        learning_rate: float,
        max_length: int | None,
        sequences: Iterable[Mapping[str, Any]],
        rank: int = 0,
    ) -> int:
        """Upsert sequence metadata by id and record that ``rank`` has reported; returns the
        step's metadata row count."""
        k = self.keys
        args: list[Any] = [repr(float(learning_rate)), "" if max_length is None else max_length]
        args += [step, int(rank)]
        for seq in sequences:
            args += [str(seq["id"]), _dumps(dict(seq))]
        keys = [
            k.seqs(run_id, step),
            k.order(run_id, step),
            k.step(run_id, step),
            k.version(run_id, step),
            k.cache(run_id, step),
            k.steps(run_id),
            k.ranks(run_id, step),
        ]
        return int(await self._upsert(keys=keys, args=args))

    async def set_realized(self, run_id: str, step: int, before: float, after: float) -> None:
        """Store the trainer's measured entropies of the step (bumps the version)."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                k.step(run_id, step),
                mapping={
                    "entropy_before": repr(float(before)),
                    "entropy_after": repr(float(after)),
                },
            )
            pipe.zadd(k.steps(run_id), {str(step): step})
            pipe.incr(k.version(run_id, step))
            _unlink(pipe, k.cache(run_id, step))
            await pipe.execute()

    async def step_counts(self, run_id: str, step: int, ranks: int = 1) -> StepCounts:
        """Counts behind ``GET .../steps/{step}`` (one transaction); ``ranks``: the run's."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zscore(k.steps(run_id), str(step))
            pipe.hlen(k.seqs(run_id, step))
            pipe.hvals(k.uploads(run_id, step))
            pipe.hget(k.step(run_id, step), "learning_rate")
            pipe.smembers(k.ranks(run_id, step))
            pipe.hlen(k.tokens(run_id, step))
            exists, n_seq, records, lr, reported, n_tokens = await pipe.execute()
        rows: set[str] = set()
        pending = 0
        errors: list[dict[str, Any]] = []
        for raw in records:
            rec = json.loads(raw)
            if rec["state"] == UPLOAD_QUEUED:
                pending += 1
            elif rec["state"] == UPLOAD_FAILED:
                errors.append(
                    {
                        "upload_id": rec["upload_id"],
                        "error": rec["error"],
                        "attempts": rec["attempts"],
                    }
                )
            else:
                rows.update(rec["ids"])
        applied = APPLIED_UPDATE_ID in rows
        rows.discard(APPLIED_UPDATE_ID)
        return StepCounts(
            exists=exists is not None,
            sequences=int(n_seq),
            rows=len(rows),
            pending_uploads=pending,
            uploads=len(records),
            applied_update=applied,
            learning_rate=None if lr is None else float(lr),
            errors=sorted(errors, key=lambda e: e["upload_id"]),
            ranks_expected=ranks,
            ranks_reported=sorted(int(_text(r)) for r in reported),
            token_sequences=max(int(n_tokens) - 1, 0),  # the hash's __meta__ field aside
        )

    async def snapshot(self, run_id: str, step: int) -> StepSnapshot:
        """Read the step's metadata, upload records and parts at one version."""
        k = self.keys
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(k.version(run_id, step))
            pipe.hgetall(k.step(run_id, step))
            pipe.zrange(k.order(run_id, step), 0, -1)
            pipe.hgetall(k.seqs(run_id, step))
            pipe.hgetall(k.uploads(run_id, step))
            version, fields, order, seqs, uploads = await pipe.execute()
        snap = StepSnapshot(
            version=int(version or 0),
            step_fields={a.decode(): b.decode() for a, b in fields.items()},
            order=[o.decode() for o in order],
            sequences={a.decode(): json.loads(b) for a, b in seqs.items()},
            uploads={a.decode(): json.loads(b) for a, b in uploads.items()},
        )
        done = [u for u, rec in snap.uploads.items() if rec["state"] == UPLOAD_DONE]
        if done:
            # Parts are immutable per upload id; same hash slot, so MGET is cluster-safe.
            values = await self.redis.mget([k.part(run_id, step, u) for u in done])
            snap.parts = {
                u: cast(bytes, v) for u, v in zip(done, values, strict=True) if v is not None
            }
        return snap

    async def version(self, run_id: str, step: int) -> int:
        """The step's data version (0 before anything was stored)."""
        return int(await self.redis.get(self.keys.version(run_id, step)) or 0)

    # ----------------------------------------------------------------- cache
    async def cache_get(self, run_id: str, step: int, version: int, query: str) -> bytes | None:
        """A cached result for ``query`` at ``version``, or None."""
        value = await self.redis.hget(self.keys.cache(run_id, step), f"{version}|{query}")
        return None if value is None else cast(bytes, value)

    async def cache_put(
        self, run_id: str, step: int, version: int, query: str, value: bytes
    ) -> None:
        """Cache ``value``; a result of an outdated version is never read again (the field
        carries the version, and every version bump unlinks the hash)."""
        key = self.keys.cache(run_id, step)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, f"{version}|{query}", value)
            pipe.expire(key, self.cache_ttl_s)
            await pipe.execute()

    async def cache_put_once(
        self, run_id: str, step: int, version: int, query: str, value: bytes
    ) -> bytes:
        """Cache ``value`` unless ``query`` already has one at ``version`` (HSETNX); returns
        the cached value, which ever process wrote it."""
        key = self.keys.cache(run_id, step)
        field = f"{version}|{query}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, field, value)
            pipe.hget(key, field)
            pipe.expire(key, self.cache_ttl_s)
            _, stored, _ = await pipe.execute()
        return cast(bytes, stored)

    # --------------------------------------------------------------- summary
    async def put_summary(
        self, run_id: str, step: int, summary: Mapping[str, Any], target: str = "sequence"
    ) -> None:
        """Keep the step's entropy summary of ``target`` (no TTL: the run's history)."""
        await self.redis.hset(
            self.keys.summary(run_id), _summary_field(step, target), _dumps(dict(summary))
        )

    async def summaries(self, run_id: str, target: str = "sequence") -> dict[int, dict[str, Any]]:
        """Every stored step summary of the run for ``target``."""
        raw = await self.redis.hgetall(self.keys.summary(run_id))
        out: dict[int, dict[str, Any]] = {}
        for name, value in raw.items():
            step, _, of = _text(name).partition(":")
            if (of or "sequence") == target:
                out[int(step)] = json.loads(value)
        return out

    # --------------------------------------------------------------- token shares
    async def put_tokens(
        self, run_id: str, step: int, meta: Mapping[str, Any], records: Mapping[str, Any]
    ) -> int:
        """Upsert the token shares of update sequences (``records``: id -> JSON-ready record)
        under ``meta`` (estimator, target, learning rate), atomically; the number of
        sequences with shares after.  Raises :class:`TokenMetaConflictError` when the step
        already holds shares of another estimator, target or learning rate."""
        key = self.keys.tokens(run_id, step)
        fields: dict[Any, bytes] = {sid: _dumps(rec) for sid, rec in records.items()}
        fields[TOKENS_META] = _dumps(dict(meta))
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    stored = await pipe.hget(key, TOKENS_META)
                    if stored is not None and json.loads(stored) != dict(meta):
                        raise TokenMetaConflictError(json.loads(stored))
                    pipe.multi()
                    pipe.hset(key, mapping=fields)
                    pipe.hlen(key)
                    _, count = await pipe.execute()
                    return int(count) - 1
                except WatchError:
                    continue

    async def tokens(
        self, run_id: str, step: int
    ) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
        """``(meta, {sequence id: record})`` of the step's token shares (``None``: none)."""
        raw = await self.redis.hgetall(self.keys.tokens(run_id, step))
        meta = raw.pop(TOKENS_META.encode(), None)
        return (
            None if meta is None else json.loads(meta),
            {_text(k): json.loads(v) for k, v in raw.items()},
        )

    async def sequence_records(self, run_id: str, step: int) -> dict[str, dict[str, Any]]:
        """The step's stored sequence metadata by id."""
        raw = await self.redis.hgetall(self.keys.seqs(run_id, step))
        return {_text(k): json.loads(v) for k, v in raw.items()}

    # --------------------------------------------------------------- uploads
    async def accept_upload(
        self,
        run_id: str,
        step: int,
        upload_id: str,
        kind: str,
        ids: list[str],
        body: bytes | bytearray,
        sketch: Callable[[], Awaitable[bytes]] | None = None,
    ) -> UploadReceipt:
        """Store a validated upload: its part at once, or its raw body and its job.

        The one place that chooses the path.  With ``sketch`` (the receiving process holds a
        sketcher on a device of its own: :class:`service.worker.ReceiptSketcher`) the body is
        sketched here and only the part is stored, done, in one transaction shared with the
        worker's (:meth:`_finish`); the raw body never reaches Redis.  Should the sketch fail,
        nothing has been stored and the upload takes the claim-check path instead (the workers
        retry it, or dead-letter it with its error).  Without ``sketch``: the claim check
        (:meth:`add_upload`).

        A re-send of an upload id already stored and not failed stores nothing
        (``new=False``) on either path; a failed upload may be re-sent to retry.
        """
        if sketch is not None:
            stored = await self.upload_state(run_id, step, upload_id)
            if stored is not None and stored != UPLOAD_FAILED:
                return UploadReceipt(new=False, sketched=stored == UPLOAD_DONE)
            try:
                part = await sketch()
            except Exception as exc:  # the workers retry it, and dead-letter it with its error
                log.warning("sketch on receipt of upload %s failed (%r): queued", upload_id, exc)
            else:
                done = {"state": UPLOAD_DONE, "done_at": time.time()}
                record = _upload_record(upload_id, kind, ids, body)
                new = await self._finish(run_id, step, upload_id, done, part=part, new=record)
                if new:
                    return UploadReceipt(new=True, sketched=True)
                stored = await self.upload_state(run_id, step, upload_id)  # stored meanwhile
                return UploadReceipt(new=False, sketched=stored == UPLOAD_DONE)
        queued = await self.add_upload(run_id, step, upload_id, kind, ids, body)
        return UploadReceipt(new=queued, sketched=False)

    async def upload_state(self, run_id: str, step: int, upload_id: str) -> str | None:
        """The stored upload's state (queued, done, failed), None when not stored."""
        raw = await self.redis.hget(self.keys.uploads(run_id, step), upload_id)
        return None if raw is None else str(json.loads(raw)["state"])

    async def add_upload(
        self,
        run_id: str,
        step: int,
        upload_id: str,
        kind: str,
        ids: list[str],
        body: bytes | bytearray,
    ) -> bool:
        """The claim check: store a validated upload's raw body, its record and its job,
        atomically.

        Returns False (and stores nothing) when the upload id is already known and not
        failed: a re-sent upload is a no-op.  A failed upload may be re-sent to retry.
        """
        k = self.keys
        record = _upload_record(upload_id, kind, ids, body)
        uploads_key = k.uploads(run_id, step)
        raw_key = k.raw(run_id, step, upload_id)
        if self.bulk is not None:
            return await anyio.to_thread.run_sync(
                self._add_upload_blocking, run_id, step, upload_id, kind, raw_key, record, body
            )
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # WATCH this upload's own claim-check key, not the step's uploads hash:
                    # ranks uploading to one step at once must not make each other retry
                    # (every retry re-sends the body); every state change of upload U
                    # also writes or unlinks raw:U.
                    await pipe.watch(raw_key)
                    existing = await pipe.hget(uploads_key, upload_id)
                    if existing is not None and json.loads(existing)["state"] != UPLOAD_FAILED:
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.set(raw_key, body, ex=self.raw_ttl_s)
                    pipe.hset(uploads_key, upload_id, _dumps(record))
                    pipe.zadd(k.steps(run_id), {str(step): step})
                    self.queue.enqueue(pipe, run_id, step, upload_id, kind)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    def _add_upload_blocking(
        self,
        run_id: str,
        step: int,
        upload_id: str,
        kind: str,
        raw_key: str,
        record: Mapping[str, Any],
        body: bytes | bytearray,
    ) -> bool:
        """:meth:`add_upload`'s transaction on the blocking ``bulk`` client (in a thread).

        Same commands and WATCH as the asyncio path above.  The blocking client writes the
        body to the socket as it is (``sendall`` per argument), where the asyncio transport
        first joins the whole pipeline into one new buffer and then copies what the socket
        did not take at once into its write buffer: two more copies of the upload in the API
        and their CPU time, on the event loop.
        """
        assert self.bulk is not None
        k = self.keys
        uploads_key = k.uploads(run_id, step)
        with self.bulk.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(raw_key)
                    existing = pipe.hget(uploads_key, upload_id)
                    if existing is not None and json.loads(existing)["state"] != UPLOAD_FAILED:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.set(raw_key, body, ex=self.raw_ttl_s)
                    pipe.hset(uploads_key, upload_id, _dumps(dict(record)))
                    pipe.zadd(k.steps(run_id), {str(step): step})
                    self.queue.enqueue(pipe, run_id, step, upload_id, kind)
                    pipe.execute()
                    return True
                except WatchError:
                    continue

    # ------------------------------------------------------- worker: the jobs
    async def job_state(self, job: Job) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(run spec, upload record)`` of ``job``, each None where gone (run deleted), read
        in one round trip."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.spec(job.run_id))
            pipe.hget(self.keys.uploads(job.run_id, job.step), job.upload_id)
            run, record = await pipe.execute()
        return (
            None if run is None else dict(json.loads(run)),
            None if record is None else dict(json.loads(record)),
        )

    async def raw_body(self, run_id: str, step: int, upload_id: str) -> bytes | None:
        """The raw body of one upload (None where expired or deleted).

        One at a time on purpose: a batch of jobs fetched with one MGET would hold
        ``worker_batch`` bodies of up to ``max_body_mb`` each in the worker at once.  Through
        the blocking ``bulk`` client when there is one: the asyncio reader appends every
        chunk to a growing buffer and slices the value out of it again, about twice the CPU
        time per byte, on the event loop.
        """
        key = self.keys.raw(run_id, step, upload_id)
        if self.bulk is not None:
            return cast(bytes | None, await anyio.to_thread.run_sync(self.bulk.get, key))
        return cast(bytes | None, await self.redis.get(key))

    async def _finish(
        self,
        run_id: str,
        step: int,
        upload_id: str,
        update: Mapping[str, Any],
        *,
        part: bytes | None = None,
        job: Job | None = None,
        dead: tuple[str, int] | None = None,
        ack: bool = True,
        new: Mapping[str, Any] | None = None,
    ) -> bool:
        """Update the upload's record, write its part or (``dead``: ``(error, attempts)``)
        its dead letter, and with ``job`` and ``ack`` acknowledge the job: one transaction.

        ``new``: the record of an upload sketched on receipt, stored (with ``update``) unless
        one is stored already and not failed.  The upload's ``raw`` key is WATCHed: a run
        deletion or a re-send of the same upload in between makes the transaction retry on
        fresh data, while other uploads of the step do not interfere.  With ``new`` its
        ``part`` key is WATCHed too: of two identical uploads sketched on receipt at once
        (neither writes ``raw``), the second to commit retries, finds the first's record and
        stores nothing.  Returns False when there is no record to update (run deleted, or
        ``new`` stored already); a job is acknowledged anyway.
        """
        k = self.keys
        uploads_key = k.uploads(run_id, step)
        watched = [k.raw(run_id, step, upload_id)]
        if new is not None:
            watched.append(k.part(run_id, step, upload_id))
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*watched)
                    raw = await pipe.hget(uploads_key, upload_id)
                    if new is not None:
                        if raw is not None and json.loads(raw)["state"] != UPLOAD_FAILED:
                            await pipe.unwatch()
                            return False
                        raw = _dumps(dict(new))
                    pipe.multi()
                    if raw is not None:
                        record = {**json.loads(raw), **update}
                        pipe.hset(uploads_key, upload_id, _dumps(record))
                        if new is not None:
                            pipe.zadd(k.steps(run_id), {str(step): step})
                        if part is not None:
                            pipe.set(k.part(run_id, step, upload_id), part)
                            _unlink(pipe, k.raw(run_id, step, upload_id))
                            pipe.incr(k.version(run_id, step))
                            _unlink(pipe, k.cache(run_id, step))
                        if dead is not None and job is not None:
                            self.queue.dead_letter_in(pipe, job, *dead)
                            _unlink(pipe, k.raw(run_id, step, upload_id))
                    if job is not None and ack:
                        self.queue.ack_in(pipe, job)
                    await pipe.execute()
                    return raw is not None
                except WatchError:
                    continue

    async def complete_upload(self, job: Job, part: bytes) -> bool:
        """Store the job's partial sketch, mark its upload done, unlink the raw body, ack."""
        update = {"state": UPLOAD_DONE, "error": None, "done_at": time.time()}
        return await self._finish(job.run_id, job.step, job.upload_id, update, part=part, job=job)

    async def dead_letter(self, job: Job, error: str, attempts: int) -> bool:
        """Mark the job's upload failed and move the job to the dead letter with its error
        (the step's status shows it)."""
        update = {"state": UPLOAD_FAILED, "error": error, "attempts": attempts}
        where = (job.run_id, job.step, job.upload_id)
        return await self._finish(*where, update, job=job, dead=(error, attempts))

    async def record_error(self, job: Job, error: str) -> None:
        """Remember the last error of a job that will be retried (shown once it is dead); the
        job stays pending."""
        where = (job.run_id, job.step, job.upload_id)
        await self._finish(*where, {"last_error": error}, job=job, ack=False)
