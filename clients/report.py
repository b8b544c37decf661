"""Terminal reports of a kernelscope service: rich tables built from the REST API.

Nothing here computes a statistic: every number is the one the API returns (math.md defines
them), fetched with :class:`clients.http.Client`; this module only orders and formats.  Used by
``kernelscope runs`` and ``kernelscope report``; importable for notebooks::

    from clients.http import Client
    from clients.report import step_report
    from rich.console import Console

    with Client("http://127.0.0.1:8000") as client:
        Console().print(*step_report(client, "grpo-demo", 3))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from clients.errors import ConflictError, NotFoundError
from clients.http import Client
from clients.results import EntropyHistory

#: How many eigenvalues the spectrum head shows, and how many sequences the "driving entropy
#: down" table lists, unless told otherwise.
DEFAULT_SPECTRUM_HEAD = 10
DEFAULT_TOP_SEQUENCES = 10
#: The prompt-pair matrix is printed only up to this many prompts (B x B grows fast).
MAX_PROMPT_MATRIX = 12

_MISSING = "—"


def format_number(value: Any) -> str:
    """The text the report prints for a value: 4 significant digits for floats.

    ``None`` prints as an em dash, non-finite floats as ``nan`` / ``inf``; ints and strings
    unchanged.  Tests use this to find the API's numbers in the report.
    """
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _num(value: Any) -> Text:
    """A table cell: numbers right-aligned, anything else left-aligned."""
    numeric = _is_number(value) or value is None
    return Text(format_number(value), justify="right" if numeric else "left")


def _key_value_table(title: str, rows: Sequence[tuple[str, Any, str]]) -> Table:
    """Three columns: quantity, value, what it is (from math.md)."""
    table = Table(title=title, title_justify="left", show_header=True, header_style="bold")
    table.add_column("quantity", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("meaning", overflow="fold")
    for name, value, meaning in rows:
        table.add_row(name, _num(value) if not isinstance(value, Text) else value, meaning)
    return table


def _utc(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)):
        return _MISSING
    return datetime.fromtimestamp(float(timestamp), tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# --------------------------------------------------------------------------------------- runs


def runs_table(runs: Sequence[Mapping[str, Any]]) -> Table:
    """One row per run of ``GET /v1/runs``: id, sketch kind / k / seed, normalisation, geometry.

    A ``steps`` column is added when the runs carry their steps (``GET /v1/runs/{id}``).
    """
    with_steps = any(isinstance(run.get("steps"), list) for run in runs)
    table = Table(title="runs", title_justify="left", header_style="bold")
    columns = ["run_id", "sketch", "k", "seed", "normalization", "geometry"]
    columns += ["steps", "created"] if with_steps else ["created"]
    for name in columns:
        table.add_column(name, justify="right" if name in ("k", "seed", "steps") else "left")
    for run in runs:
        sketch = run.get("sketch") or {}
        groups = sketch.get("groups") or []
        kind = str(sketch.get("kind", _MISSING)) + (f" ({len(groups)} groups)" if groups else "")
        cells = [
            str(run.get("run_id", _MISSING)),
            kind,
            format_number(run.get("k", sketch.get("dim"))),
            format_number(sketch.get("seed")),
            str(run.get("normalization", _MISSING)),
            str(run.get("geometry", _MISSING)),
        ]
        if with_steps:
            steps = run.get("steps")
            cells.append(format_number(len(steps)) if isinstance(steps, list) else _MISSING)
        cells.append(_utc(run.get("created_at")))
        table.add_row(*cells)
    if not runs:
        table.caption = "no runs yet: POST /v1/runs (see docs/cli.md)"
    return table


def run_list(client: Client) -> list[RenderableType]:
    """``kernelscope runs``: the runs table of ``GET /v1/runs``."""
    return [runs_table([run.raw for run in client.runs()])]


# ------------------------------------------------------------------------------------ history


def history_table(run_id: str, history: EntropyHistory) -> Table:
    """``GET /v1/runs/{run_id}/entropy``: predicted vs realized entropy change per step."""
    unit = "nats per token" if history.steps and history.steps[0].target == "token_mean" else "nats"
    table = Table(
        title=f"run {run_id}: entropy change per step ({unit})",
        title_justify="left",
        header_style="bold",
    )
    columns = (
        ("step", "step"),
        ("dH1", "delta_h1"),
        ("se_sampling", "se_sampling"),
        ("se_sketch", "se_sketch"),
        ("realized", "realized"),
        ("realized_se", "realized_se"),
        ("KL", "kl"),
        ("dH1_applied", "delta_h1_applied"),
        ("dH2", "delta_h2"),
        ("estimator", "estimator"),
    )
    for header, _ in columns[:6]:
        table.add_column(header, justify="right", overflow="fold")
    table.add_column("realized/dH1 [2 s.e.]", justify="right", overflow="fold")
    for header, _ in columns[6:]:
        table.add_column(
            header, justify="left" if header == "estimator" else "right", overflow="fold"
        )
    table.add_column("spectrum head", overflow="fold")
    for row in history.steps:
        cells = [format_number(getattr(row, key)) for _, key in columns]
        table.add_row(
            *cells[:6],
            ratio_text(vars(row)),
            *cells[6:],
            ", ".join(format_number(float(x)) for x in row.spectrum_head[:3]),
        )
    if not history.steps:
        table.caption = "no analysed step yet"
    else:
        table.caption = RATIO_CAPTION
    return table


RATIO_CAPTION = (
    "realized/dH1 with its Fieller interval; 'not estimable': |dH1| <= 2 s.e.; "
    "'outside Taylor': KL(pi||pi') > 0.3, too large a step for a Taylor prediction (math.md §6)"
)


def ratio_text(row: Mapping[str, Any]) -> str:
    """The ratio cell of a history row or an entropy answer (flattened keys ``ratio``,
    ``ratio_low``, ``ratio_high``, ``ratio_estimable``, ``regime``): the flag instead of the
    number when the step is outside the Taylor regime or the ratio is not estimable."""
    if row.get("regime") == "outside":
        return "outside Taylor"
    if row.get("ratio") is None:
        return _MISSING
    if row.get("ratio_estimable") is False:
        return "not estimable"
    low, high = row.get("ratio_low"), row.get("ratio_high")
    text = f"{row['ratio']:.2f}"
    if _is_number(low) and _is_number(high):
        text += f" [{low:.2f}, {high:.2f}]"
    if row.get("regime") == "second_order":
        text += " (2nd order)"
    return text


# --------------------------------------------------------------------------------------- step


def step_status_table(status: Mapping[str, Any]) -> Table:
    """``GET .../steps/{step}``: state, counts and dead-lettered uploads."""
    rows: list[tuple[str, Any, str]] = [
        ("state", status.get("state"), "pending: uploads queued; failed: see errors"),
        ("sequences", status.get("sequences"), "sequences with metadata"),
        ("rows", status.get("rows"), "sketched gradient rows"),
        ("pending_uploads", status.get("pending_uploads"), "uploads not yet sketched"),
        ("uploads", status.get("uploads"), "uploads received"),
        ("learning_rate", status.get("learning_rate"), "eta"),
        ("applied_update", status.get("applied_update"), "the __applied_update__ row is present"),
    ]
    table = _key_value_table(
        f"run {status.get('run_id', '?')}, step {status.get('step', '?')}", rows
    )
    errors = status.get("errors") or []
    if errors:
        table.caption = "; ".join(
            f"upload {e.get('upload_id')}: {e.get('error')} ({e.get('attempts')} attempts)"
            for e in errors[:5]
        )
    return table


def _se_total(entropy: Mapping[str, Any]) -> float | None:
    parts: list[Any] = [entropy.get("se_sampling"), entropy.get("se_sketch")]
    if not all(_is_number(p) for p in parts):
        return None
    return math.sqrt(sum(float(p) ** 2 for p in parts))


def entropy_table(entropy: Mapping[str, Any]) -> Table:
    """The headline numbers of ``GET .../entropy`` with their error bars (math.md §4, §6)."""
    realized_obj = entropy.get("realized") or {}
    interval = entropy.get("ratio_interval") or {}
    taylor = entropy.get("taylor") or {}
    flat = {
        "ratio": entropy.get("ratio"),
        "ratio_low": interval.get("low"),
        "ratio_high": interval.get("high"),
        "ratio_estimable": interval.get("estimable"),
        "regime": taylor.get("regime"),
    }
    rows: list[tuple[str, Any, str]] = [
        ("target", entropy.get("target"), "sequence (nats) / token_mean (nats per token)"),
        ("estimator", entropy.get("estimator"), "independent / u_statistic / plugin / cross_fit"),
        (
            "grad H from",
            entropy.get("entropy_gradient"),
            "score rows alone / entropy sums and their gradients (math.md §3)",
        ),
        ("update rows", entropy.get("num_update"), "sequences driving the step (U)"),
        ("entropy rows", entropy.get("num_entropy"), "sequences estimating grad H (E)"),
        ("prompts", entropy.get("num_prompts"), "B"),
        ("dH1", entropy.get("delta_h1"), "first-order entropy change eta <grad_hat H, g_hat>"),
        ("se_sampling", entropy.get("se_sampling"), "std error from the sampled sequences"),
        ("se_sketch", entropy.get("se_sketch"), "std error from the random sketch"),
        ("se_total", _se_total(entropy), "sqrt(se_sampling^2 + se_sketch^2)"),
        ("realized", realized_obj.get("delta_h"), "the entropy change that happened"),
        ("realized_se", realized_obj.get("se"), "its std error (importance sampling, math.md §6)"),
        ("realized/dH1", ratio_text(flat), "1 = first order explains it; [2 s.e. interval]"),
        ("KL(pi||pi')", taylor.get("kl"), "the step's size, nats (math.md §6)"),
        ("KL se", taylor.get("kl_se"), "its std error"),
        ("regime", taylor.get("regime"), "; ".join(taylor.get("reasons") or [])),
        ("dH1_applied", entropy.get("delta_h1_applied"), "<grad_hat H, u> with the applied update"),
        ("dH2", entropy.get("delta_h2"), "second-order (curvature) term"),
        ("dH1+dH2", entropy.get("delta_h1_plus_h2"), "compare with realized"),
        ("dH1_diag", entropy.get("delta_h1_diag"), "dH1 if K were diagonal"),
        ("cov_baseline", entropy.get("cov_baseline"), "-(1/B) sum_p Cov(S, A) (identity kernel)"),
        ("learning_rate", entropy.get("learning_rate"), "eta"),
        ("step_norm", entropy.get("step_norm"), "eta |g_hat|: dH1 is linear in it"),
    ]
    for key in ("source", "estimator", "delta_h_snis", "entropy_before", "entropy_after"):
        if key in realized_obj:
            rows.append((f"realized.{key}", realized_obj[key], ""))
    noise = entropy.get("noise_scale")
    if isinstance(noise, Mapping):
        for key, value in noise.items():
            if _is_number(value) or value is None:
                rows.append((f"noise_scale.{key}", value, "gradient noise scale (math.md §5)"))
    elif noise is not None:
        rows.append(("noise_scale", noise, "B_simple = tr(Sigma) / |G|^2"))
    return _key_value_table("entropy change (nats)", rows)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mapping_table(title: str, data: Mapping[str, Any]) -> Table | None:
    """A table for one part of the decomposition, whatever its exact layout.

    ``{name: number}`` gives two columns; ``{name: {field: number}}`` one row per name with the
    union of fields as columns; ``[{field: value}]`` one row per item.
    """
    items: list[tuple[str, Any]] = list(data.items())
    if not items:
        return None
    table = Table(title=title, title_justify="left", header_style="bold")
    if all(_is_number(v) or v is None for _, v in items):
        table.add_column("part")
        table.add_column("value", justify="right")
        for name, value in items:
            table.add_row(str(name), _num(value))
        return table
    if all(isinstance(v, Mapping) for _, v in items):
        fields: list[str] = []
        for _, value in items:
            fields += [
                f for f in value if f not in fields and not isinstance(value[f], (dict, list))
            ]
        table.add_column("part")
        for field in fields:
            table.add_column(field, justify="right")
        for name, value in items:
            table.add_row(str(name), *(_num(value.get(f)) for f in fields))
        return table
    return None


def _list_table(title: str, rows: Sequence[Mapping[str, Any]]) -> Table | None:
    if not rows or not all(isinstance(r, Mapping) for r in rows):
        return None
    fields: list[str] = []
    for row in rows:
        fields += [f for f in row if f not in fields and not isinstance(row[f], (dict, list))]
    table = Table(title=title, title_justify="left", header_style="bold")
    for field in fields:
        table.add_column(field, justify="right" if _is_number(rows[0].get(field)) else "left")
    for row in rows:
        table.add_row(*(_num(row.get(f)) for f in fields))
    return table


def decomposition_tables(decomposition: Mapping[str, Any]) -> list[Table]:
    """One table per part of ``decomposition``: pair types, quadrants, groups (math.md §4)."""
    tables: list[Table] = []
    for part, data in decomposition.items():
        title = f"dH1 by {part.replace('_', ' ')}"
        table: Table | None = None
        if isinstance(data, Mapping):
            table = _mapping_table(title, data)
        elif isinstance(data, list):
            table = _list_table(title, data)
        elif _is_number(data):
            table = _mapping_table("dH1 decomposition", {part: data})
        if table is not None:
            tables.append(table)
    return tables


#: Columns of the "driving entropy down" table, in order, when the API gives them.
_SEQUENCE_COLUMNS = ("id", "prompt_id", "role", "advantage", "logprob", "num_tokens", "a")


def top_sequences_table(
    per_sequence: Any, delta_h1: Any = None, top: int = DEFAULT_TOP_SEQUENCES
) -> Table | None:
    """The ``top`` update sequences with the most negative contribution ``a_i`` to dH1.

    ``a_i = eta c_i sum_j h_j K(j, i)`` (math.md §4): these sequences drive entropy down.
    ``delta_h1``, when given, adds each one's share ``a_i / dH1``.
    """
    if not isinstance(per_sequence, list):
        return None
    entries = [e for e in per_sequence if isinstance(e, Mapping) and _is_number(e.get("a"))]
    if not entries:
        return None
    ranked = sorted(entries, key=lambda e: float(e["a"]))[:top]
    columns = [c for c in _SEQUENCE_COLUMNS if any(c in e for e in ranked)]
    table = Table(
        title=f"top {len(ranked)} sequences driving entropy down (most negative a_i)",
        title_justify="left",
        header_style="bold",
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("id", "prompt_id", "role") else "right"
        )
    with_share = _is_number(delta_h1) and delta_h1 != 0
    if with_share:
        table.add_column("a_i / dH1", justify="right")
    for entry in ranked:
        cells = [_num(entry.get(c)) for c in columns]
        if with_share:
            cells.append(_num(float(entry["a"]) / float(delta_h1)))
        table.add_row(*cells)
    return table


def token_text(token: Mapping[str, Any]) -> str:
    """A token as the report prints it: its text quoted (spaces and newlines visible), or
    ``#id`` when the trainer sent no text."""
    text = token.get("token")
    if text is None:
        return f"#{token.get('token_id')}"
    return json.dumps(text, ensure_ascii=False)


def token_table(title: str, tokens: Sequence[Mapping[str, Any]]) -> Table:
    """Tokens of ``GET .../tokens`` in the API's order: where each is, its text, its exact
    share of dH1 and its covariance score (math.md §9)."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for column, justify in (
        ("sequence", "left"),
        ("position", "right"),
        ("token", "left"),
        ("share", "right"),
        ("cov_score", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for token in tokens:
        table.add_row(
            Text(str(token.get("sequence_id"))),
            _num(token.get("position")),
            Text(token_text(token)),
            _num(token.get("share")),
            _num(token.get("cov_score")),
        )
    return table


def covariance_text(covariance: Mapping[str, Any]) -> Text:
    """Two lines: KL-Cov's and Clip-Cov's picks (Cui et al.) held against the exact shares."""
    c = covariance
    return Text(
        f"KL-Cov (ratio {format_number(c.get('kl_cov_ratio'))}): "
        f"k = {format_number(c.get('k'))} of {format_number(c.get('num_tokens'))} tokens, "
        f"precision at k {format_number(c.get('precision_at_k'))}, "
        f"Spearman(cov_score, -share) {format_number(c.get('spearman'))}, "
        f"share of dH1 {format_number(c.get('selected_share'))}\n"
        f"Clip-Cov (ratio {format_number(c.get('clip_cov_ratio'))}, cov_score in "
        f"[{format_number(c.get('clip_cov_lb'))}, {format_number(c.get('clip_cov_ub'))}]): "
        f"{format_number(c.get('clip_candidates'))} candidates, "
        f"share of dH1 {format_number(c.get('clip_candidate_share'))}"
    )


def tokens_section(tokens: Mapping[str, Any]) -> list[RenderableType]:
    """A line of totals, the tokens pushing entropy down and up most, and the covariance
    comparison's lines."""
    unit = "nats per token" if tokens.get("target") == "token_mean" else "nats"
    out: list[RenderableType] = [
        Text(
            f"token shares (math.md §9): {format_number(tokens.get('num_tokens'))} tokens of "
            f"{format_number(tokens.get('num_sequences'))} sequences, exact shares of dH1 "
            f"summing to {format_number(tokens.get('total'))} {unit}"
        )
    ]
    for side in ("down", "up"):
        rows = tokens.get(side) or []
        out.append(token_table(f"top {len(rows)} tokens pushing entropy {side}", rows))
    covariance = tokens.get("covariance")
    if isinstance(covariance, Mapping):
        out.append(covariance_text(covariance))
    return out


def spectrum_table(spectrum: Mapping[str, Any], head: int = DEFAULT_SPECTRUM_HEAD) -> Table:
    """Largest eigenvalues of K with their share of the trace; rank summaries in the caption."""
    eigenvalues = [float(x) for x in spectrum.get("eigenvalues", [])]
    trace = spectrum.get("trace")
    total = float(trace) if _is_number(trace) and trace else sum(eigenvalues)
    table = Table(title="kernel spectrum (head)", title_justify="left", header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("eigenvalue", justify="right")
    table.add_column("share of trace", justify="right")
    table.add_column("cumulative", justify="right")
    cumulative = 0.0
    for index, value in enumerate(eigenvalues[:head], start=1):
        share = value / total if total else None
        cumulative += share or 0.0
        table.add_row(str(index), _num(value), _num(share), _num(cumulative if total else None))
    table.caption = (
        f"n = {len(eigenvalues)}, trace = {format_number(trace)}, "
        f"effective rank = {format_number(spectrum.get('effective_rank'))}, "
        f"participation ratio = {format_number(spectrum.get('participation_ratio'))}"
    )
    return table


def blocks_tables(blocks: Mapping[str, Any]) -> list[Table]:
    """Pair-type statistics of K (math.md §5) and, for few prompts, the prompt-pair mean K."""
    pair_types = {
        name: blocks[name]
        for name in ("diagonal", "same_prompt", "cross_prompt")
        if isinstance(blocks.get(name), Mapping)
    }
    tables: list[Table] = []
    table = _mapping_table("kernel blocks by pair type", pair_types)
    if table is not None:
        tables.append(table)
    matrix = blocks.get("prompt_matrix")
    if isinstance(matrix, Mapping):
        prompts = [str(p) for p in matrix.get("prompts", [])]
        mean_k = matrix.get("mean_k") or []
        if prompts and len(prompts) <= MAX_PROMPT_MATRIX and len(mean_k) == len(prompts):
            grid = Table(
                title="mean K per prompt pair (diagonal blocks: i != j)",
                title_justify="left",
                header_style="bold",
            )
            grid.add_column("prompt")
            for prompt in prompts:
                grid.add_column(prompt, justify="right")
            for prompt, row in zip(prompts, mean_k, strict=True):
                grid.add_row(prompt, *(_num(v) for v in row))
            tables.append(grid)
    return tables


def step_report(
    client: Client,
    run_id: str,
    step: int,
    *,
    estimator: str | None = None,
    target: str = "sequence",
    role: str | None = None,
    top: int = DEFAULT_TOP_SEQUENCES,
    head: int = DEFAULT_SPECTRUM_HEAD,
    wait_s: float | None = None,
    kl_cov_ratio: float | None = None,
) -> list[RenderableType]:
    """Every table of ``kernelscope report RUN STEP``, in print order.

    A step that is not ``ready`` gives only its status table (analysis would answer 409).
    ``estimator`` / ``role`` are passed to the API (its defaults when None), and ``target``
    (``sequence`` or ``token_mean``, math.md §8); ``wait_s`` is the
    API's ``?wait=`` for a step whose uploads are still being sketched.  When the trainer
    pushed token shares, the ``top`` tokens pushing entropy down and up follow, with KL-Cov's
    choice at ``kl_cov_ratio`` (the service's default, verl's, when None) held against them.
    """
    if wait_s:
        # A cheap analysis call that blocks server-side until the step is ready (or times out).
        with suppress(ConflictError):
            client.diagonal(run_id, step, role=role, wait=wait_s)
    status = client.step_status(run_id, step).raw
    out: list[RenderableType] = [step_status_table(status)]
    if status.get("state") != "ready":
        return out
    entropy = client.entropy(run_id, step, estimator=estimator, target=target).raw
    out.append(entropy_table(entropy))
    decomposition = entropy.get("decomposition")
    if isinstance(decomposition, Mapping):
        out.extend(decomposition_tables(decomposition))
    top_table = top_sequences_table(entropy.get("per_sequence"), entropy.get("delta_h1"), top)
    if top_table is not None:
        out.append(top_table)
    out.append(spectrum_table(client.spectrum(run_id, step, role=role).raw, head))
    out.extend(blocks_tables(client.blocks(run_id, step, role=role).raw))
    try:
        tokens = client.tokens(run_id, step, top=top, kl_cov_ratio=kl_cov_ratio).raw
    except NotFoundError:
        return out  # the step is known (its status came back): it has no token shares
    out.extend(tokens_section(tokens))
    return out


def run_history(client: Client, run_id: str, target: str = "sequence") -> list[RenderableType]:
    """``kernelscope report RUN``: the run's entropy history table (of ``target``)."""
    return [history_table(run_id, client.history(run_id, target=target))]
