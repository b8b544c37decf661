"""kernelscope inside TRL's ``GRPOTrainer`` and ``RLOOTrainer`` (extra ``kernelscope[trl]``).

:class:`KernelscopeGRPOTrainer` is a ``trl.GRPOTrainer`` that, at every optimizer step, pushes
to a kernelscope service what the step is made of (math.md §1):

* per sequence: ``prompt_id`` (its generation group), ``logprob`` ``S_i``, ``advantage`` (TRL's,
  after its ``scale_rewards``), ``num_tokens`` (its completion-mask length) and ``weight``:
  the factor TRL's loss puts on ``A_i dS_i/dtheta`` (:func:`trl_sequence_weights`), so that
  ``sum_i weight_i A_i dS_i/dtheta`` *is* the negative gradient of TRL's loss for the step,
  gradient accumulation included;
* per sequence, its score gradient ``w_i = dS_i/dtheta`` (``sqrt(P_t) w_i`` in the ``adam``
  geometry, the default with Adam/AdamW), captured just before ``optimizer.step()``: exact rows
  a chunk at a time or formed layer by layer in hooks, pushed raw or sketched on the trainer
  (``sketch_on``), or, for ``kronecker`` in ``sgd`` geometry, factorised sketches;
* after ``optimizer.step()``: the applied update ``theta_after - theta_before`` (the reserved
  row ``__applied_update__``, so ``delta_h1_applied`` accounts for Adam, clipping, weight
  decay) and ``logprob_after`` of the same sequences (realized change, second order).

It reads the fields TRL already computed (``prompt_ids``, ``prompt_mask``,
``completion_ids``, ``completion_mask``, ``advantages``, ``num_items_in_batch``) in
``compute_loss``; the capture itself runs extra forward/backward passes with
``torch.autograd.grad`` / ``torch.func`` and never touches ``.grad``, so training is unchanged.

Supported settings (checked at construction; anything else raises
:class:`UnsupportedTRLSettingError`): see ``docs/trl.md``.  In short, every loss built from the
sampled tokens' log-probs: on-policy steps through the weights, and later PPO passes, the KL
term, clipping, token and tool masks and importance corrections through update rows
(:func:`trl_token_coefficients`, math.md §4 "Update rows"), and so are an entropy bonus and a
mixture-of-experts model's load-balancing loss.  Refused: FSDP1, DeepSpeed ZeRO 0.  Under
accelerate/DDP, FSDP2 or DeepSpeed ZeRO 1-3 every rank pushes its own completions and the run
waits for all of them (``ranks``; docs/trl.md "Many ranks"); under FSDP2 and ZeRO 3 the rows
come from hooks and the applied update is sketched from the ranks' shards or partitions
(:mod:`clients.shards`, :mod:`clients.zero`).  With ``temperature != 1`` every log-prob is the
tempered policy's, as TRL trains it, and so is the entropy predicted.  A vision-language
policy's image inputs go with each micro-batch to every forward of the capture, which studies
its language side (docs/real-run.md "Vision-language models").

:class:`KernelscopeRLOOTrainer` does the same for ``trl.RLOOTrainer``, whose loss is built on
the same log-probs (docs/trl.md, "Use": RLOO).
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import torch
from torch import nn

try:
    from accelerate.utils import DistributedType
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
    from trl import GRPOTrainer, RLOOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "clients.trl needs the optional extra: pip install 'kernelscope[trl]'"
    ) from exc

from clients.capture import (
    SequenceBatch,
    iter_captured_chunks,
    repack,
    sequence_logprobs,
    sequence_logprobs_and_entropy_sums,
)
from clients.errors import KernelscopeError, NotFoundError, ValidationError
from clients.filters import ParameterFilter, select_parameters
from clients.geometry import (
    adam_applied_update,
    adam_gradient_share,
    adam_state_update,
    adam_states,
    adam_step_counts,
    adam_step_preconditioner,
    adam_taken_preconditioner,
    is_adam,
    is_adam_type,
    unscaled,
)
from clients.http import Client
from clients.shards import FlatRange, GatheredOnAccess, full_shape, is_sharded, sketch_of_whole
from clients.token_shares import half_directions, token_shares_cross_fit
from clients.uploads import RowKind
from clients.zero import local_partition
from sketch.base import Sketcher
from sketch.entropy import estimator_entropy_coefficients, estimator_halves
from sketch.rao_blackwell import entropy_sum_coefficients
from sketch.sequences import StepSequences
from sketch.spec import SketchSpec, build_sketcher

if TYPE_CHECKING:
    from clients.factorised import FactorisedCapture, FactorisedSketches, HookedCapture

#: Above this many studied parameters, ``sketch_on="auto"`` sketches rows on the trainer and
#: pushes ``k`` floats per sequence instead of ``N`` (docs/trl.md "Where rows are sketched").
TRAINER_SKETCH_MIN_PARAMETERS = 1 << 20

#: the file in each checkpoint that names the run it was saved from (``train()`` resumed from
#: it continues that run when no ``run_id`` is configured; docs/trl.md "Resuming")
RUN_ID_FILE = "kernelscope.json"

#: seconds a step waits for ``GET /healthz`` after a push has failed (``on_push_error="warn"``)
PROBE_TIMEOUT_S = 5.0

#: seconds the main process waits for a pushed step to be ready before it logs the step's
#: answers (``log_metrics``); a step not ready by then is not logged (a warning)
LOG_WAIT_S = 60.0

#: sampling settings that make the sampler draw from another distribution than the policy's,
#: and the values at which they do (the last four only in ``generation_kwargs``; a top-k of 0
#: or -1 is off, in transformers' and vLLM's conventions)
_SAMPLER_CHANGES: dict[str, Callable[[float], bool]] = {
    "top_p": lambda v: v < 1.0,
    "top_k": lambda v: v > 0,
    "min_p": lambda v: v > 0.0,
    "repetition_penalty": lambda v: v != 1.0,
    "typical_p": lambda v: v < 1.0,
    "epsilon_cutoff": lambda v: v > 0.0,
    "eta_cutoff": lambda v: v > 0.0,
    "no_repeat_ngram_size": lambda v: v > 0,
}

#: what makes the trainer capture rows by hooks, for the refusals that need them
_ROWS_FROM_HOOKS = (
    "use a sketch kind other than exact, sketch_on='trainer' (or 'auto' above "
    f"{TRAINER_SKETCH_MIN_PARAMETERS} parameters) and capture_method 'auto' or 'hooks'"
)

#: The model inputs a vision-language model's micro-batch carries besides its tokens, as
#: ``GRPOTrainer._compute_loss`` passes them to the model (TRL 1.16): for one forward of the
#: whole micro-batch each is passed as it is, except the counts TRL slices by
#: (``num_images``, ``num_tiles``) and the per-token ones, which are re-packed with the tokens.
_TRL_MODEL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
_TRL_PER_TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")
_TRL_SLICE_COUNTS = ("num_images", "num_tiles")

#: Loss types whose on-policy gradient is ``-sum_i weight_i A_i dS_i/dtheta`` (see
#: :func:`trl_sequence_weights`).
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "cispo", "vespo")

#: The service's normalisation whose default ``lambda_i`` equals TRL's weight (math.md §2),
#: used as the run's ``normalization``; explicit ``weight`` values are pushed in every case.
_RUN_NORMALIZATION = {
    "grpo": "grpo",
    "sapo": "grpo",
    "dr_grpo": "dr_grpo",
    "luspo": "sequence_mean",
}


class UnsupportedTRLSettingError(ValueError):
    """A ``GRPOConfig`` setting under which kernelscope cannot reproduce TRL's gradient."""


def trl_sequence_weights(
    loss_type: str,
    completion_mask: torch.Tensor,
    *,
    gradient_accumulation_steps: int,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
    steps_per_generation: int = 1,
    num_processes: int = 1,
    epsilon_high: float | None = None,
) -> torch.Tensor:
    """``lambda_i`` of one TRL micro-batch: float64 ``[b]``.

    TRL's loss for a micro-batch of ``b`` completions, at PPO ratio 1 (``coef_1 = exp(logp -
    logp.detach())``, whose gradient is ``dlogp``), has the gradient
    ``-sum_i lambda_i A_i dS_i/dtheta`` with (``n_i`` = ``completion_mask[i].sum()``,
    ``GA`` = gradient accumulation steps, ``P`` = processes, DDP averaging over them):

    ============================  =============================================================
    ``grpo``, ``sapo``            ``1 / (b * max(n_i, 1) * GA * P)``  (per-sequence token mean)
    ``bnpo``                      ``1 / (max(sum_i n_i, 1) * GA * P)``  (micro-batch token mean)
    ``dr_grpo``                   ``1 / (b * max_completion_length * GA * P)``
    ``dapo``, ``cispo``, ``vespo``  ``spg / (max(N_items, 1) * GA)``, ``N_items`` = completion
                                  tokens of the whole generation batch (all processes), ``spg``
                                  = steps per generation; ``cispo`` times ``min(1, eps_high)``
    ``luspo``                     ``1 / (b * GA * P)``  (sequence sum, batch mean)
    ============================  =============================================================

    ``sapo``'s soft gate ``sigmoid(tau (r - 1)) 4 / tau`` has slope 1 at ``r = 1`` and
    ``vespo``'s gamma weight is 1 at ``w = 1``, so they reduce to the rows above; sequence-level
    importance sampling gives the same weights at ratio 1 (``d/dtheta`` of ``n_i`` times the
    mean log-ratio is ``dS_i``).
    """
    mask = completion_mask.to(torch.float64)
    b = mask.shape[0]
    ga = float(gradient_accumulation_steps)
    lengths = mask.sum(dim=1)
    if loss_type in ("grpo", "sapo"):
        return 1.0 / (b * lengths.clamp(min=1.0) * ga * num_processes)
    if loss_type == "bnpo":
        return torch.full(
            (b,), 1.0 / (max(float(lengths.sum()), 1.0) * ga * num_processes), dtype=torch.float64
        )
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length")
        return torch.full(
            (b,), 1.0 / (b * max_completion_length * ga * num_processes), dtype=torch.float64
        )
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"{loss_type} needs num_items_in_batch")
        # TRL: normalizer = N_items / P * GA / spg, and DDP averages the P ranks' gradients.
        normalizer = max(float(num_items_in_batch), 1.0) / num_processes * ga / steps_per_generation
        value = 1.0 / (normalizer * num_processes)
        if loss_type == "cispo":
            if epsilon_high is None:
                raise ValueError("cispo needs epsilon_high")
            value *= min(1.0, float(epsilon_high))
        return torch.full((b,), value, dtype=torch.float64)
    if loss_type == "luspo":
        return torch.full((b,), 1.0 / (b * ga * num_processes), dtype=torch.float64)
    raise UnsupportedTRLSettingError(
        f"loss_type={loss_type!r} is not supported; supported: {', '.join(SUPPORTED_LOSS_TYPES)}"
    )


class TokenCoefficients(NamedTuple):
    """The per-token coefficients of TRL's loss on one micro-batch, ``[b, T]`` float32 laid
    out like ``completion_ids`` (math.md §4 "Update rows"): ``logprob`` ``c_{i,t} = -(1/P)
    dL/d log pi_{i,t}`` and, with an entropy bonus, ``entropy`` ``e_{i,t} = -(1/P)
    dL/dH_{i,t}`` (None without one); ``P`` processes, whose gradients DDP averages.
    ``router``: ``-(1/P) dL/d aux`` of a mixture-of-experts model's load-balancing loss
    ``aux`` over the micro-batch (0 without one)."""

    logprob: torch.Tensor
    entropy: torch.Tensor | None
    router: float = 0.0


def has_loss_of_its_own(trainer_class: type) -> bool:
    """Whether a GRPO or RLOO trainer class has a ``compute_loss`` or ``_compute_loss`` other
    than TRL's and the kernelscope trainer's (its own, or a class's after the kernelscope
    trainer in its MRO): then its token coefficients cannot be told from a micro-batch's
    inputs."""
    ours = (KernelscopeGRPOTrainer, KernelscopeRLOOTrainer, GRPOTrainer, RLOOTrainer)
    return any(
        name in vars(cls)
        for cls in trainer_class.__mro__
        if issubclass(cls, (GRPOTrainer, RLOOTrainer)) and cls not in ours
        for name in ("compute_loss", "_compute_loss")
    )


#: set on a trainer while :func:`trl_token_coefficients` runs its loss: the kernelscope
#: trainer's ``compute_loss`` then records nothing
_COEFFICIENTS_PASS = "_kernelscope_coefficients_pass"


@contextlib.contextmanager
def _trl_state_kept(trainer: GRPOTrainer | RLOOTrainer) -> Iterator[None]:
    """Run TRL's loss once more without side effects: its logged metrics and its adaptive
    entropy controller (window statistics, coefficient, last world entropy) are as before."""
    metrics = {mode: {k: len(v) for k, v in m.items()} for mode, m in trainer._metrics.items()}
    names = ("entropy_coef", "_entropy_window_stats", "_last_world_entropy")
    controller = {name: getattr(trainer, name) for name in names if hasattr(trainer, name)}
    try:
        yield
    finally:
        for name, value in controller.items():
            setattr(trainer, name, value)
        for mode, logged in trainer._metrics.items():
            kept = metrics.get(mode, {})
            for key in list(logged):
                if key in kept:
                    del logged[key][kept[key] :]
                else:
                    del logged[key]


def trl_token_coefficients(
    trainer: GRPOTrainer | RLOOTrainer, model: nn.Module, inputs: Mapping[str, Any]
) -> TokenCoefficients:
    """The token coefficients of the trainer's loss on one micro-batch
    (:class:`TokenCoefficients`).

    The trainer's ``compute_loss`` (TRL's, or a subclass's built on TRL's log-probs; the
    kernelscope trainer's passes straight through) runs as it does in training, except that
    its per-token log-probs (and, with an entropy bonus, its per-token entropies) are replaced
    by leaves (the same values, detached): autograd of the loss with respect to them gives
    every token's coefficients, whatever the loss type, PPO ratio, clipping, KL term, token
    mask, importance weight or entropy bonus (static or adaptive).  A mixture-of-experts
    model's load-balancing loss, which TRL adds to its loss, is a leaf too: its coefficient is
    ``router``.  The model's forward runs without a graph, so this costs one forward.  Nothing
    is written to ``.grad``, and TRL's logged metrics and adaptive entropy controller are left
    as they were.
    """
    real = trainer._get_per_token_logps_and_entropies
    leaves: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []

    def as_leaves(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            logps, entropies, aux, *rest = real(*args, **kwargs)
        leaf = logps.detach().requires_grad_(True)
        entropy_leaf = None if entropies is None else entropies.detach().requires_grad_(True)
        aux_leaf = aux.detach().requires_grad_(True) if isinstance(aux, torch.Tensor) else None
        leaves.append((leaf, entropy_leaf, aux_leaf))
        return (leaf, entropy_leaf, aux if aux_leaf is None else aux_leaf, *rest)

    trainer._get_per_token_logps_and_entropies = as_leaves  # type: ignore[method-assign]
    setattr(trainer, _COEFFICIENTS_PASS, True)
    try:
        with _trl_state_kept(trainer):
            loss = trainer.compute_loss(model, dict(inputs))
    finally:
        del trainer._get_per_token_logps_and_entropies
        delattr(trainer, _COEFFICIENTS_PASS)
    if len(leaves) != 1:
        raise RuntimeError(
            f"the trainer's loss computed TRL's per-token log-probs {len(leaves)} times, "
            "expected once: update rows need a loss built on them"
        )
    logps, entropies, aux = leaves[0]
    wrt = [t for t in (logps, entropies, aux) if t is not None]
    grads = dict(zip(map(id, wrt), torch.autograd.grad(loss, wrt, allow_unused=True), strict=True))
    # DDP averages the ranks' gradients: this rank's share of the step's gradient is 1/P.
    share = -1.0 / trainer.accelerator.num_processes
    if not getattr(trainer, "loss_is_scaled_for_ga", True):
        # transformers' training_step divides the loss by the accumulation steps (RLOO's)
        share /= float(trainer.current_gradient_accumulation_steps)

    def coefficient(leaf: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return (
            torch.zeros_like(leaf, dtype=torch.float32) if grad is None else (share * grad).float()
        )

    entropy = None
    if entropies is not None and getattr(trainer, "_entropy_bonus_enabled", False):
        entropy = coefficient(entropies, grads[id(entropies)])
    router = 0.0
    if aux is not None and grads[id(aux)] is not None:
        router = share * float(grads[id(aux)])
    return TokenCoefficients(coefficient(logps, grads[id(logps)]), entropy, router)


def check_supported(trainer: GRPOTrainer | RLOOTrainer) -> None:
    """Raise :class:`UnsupportedTRLSettingError` naming every setting of ``trainer`` that the
    capture cannot reproduce (see ``docs/trl.md``).  Settings whose gradient is a sum over the
    sampled tokens' log-probs and entropies (later PPO passes, the KL term, clipping, token and
    tool masks, the off-policy mask, vLLM's importance correction, the entropy bonus) are
    covered by update rows
    (:func:`trl_token_coefficients`); what remains is what does not flow through those
    log-probs, or what the capture does not compute the same way."""
    args: Any = trainer.args  # a GRPOConfig or an RLOOConfig
    problems: list[str] = []
    if isinstance(trainer, GRPOTrainer) and trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        problems.append(
            f"loss_type={trainer.loss_type!r} (supported: {', '.join(SUPPORTED_LOSS_TYPES)})"
        )
    if trainer.num_iterations != 1 and args.gradient_accumulation_steps > args.steps_per_generation:
        problems.append(
            f"num_iterations={trainer.num_iterations} with gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps} > steps_per_generation="
            f"{args.steps_per_generation}: one optimizer step would train on the same completions "
            "twice, under one sequence id"
        )
    if problems:
        raise UnsupportedTRLSettingError(
            "kernelscope cannot reproduce this step's gradient: " + "; ".join(problems)
        )


@dataclass
class KernelscopeConfig:
    """Where and how to push.

    Attributes
    ----------
    url, token:
        the service (``kernelscope serve``) and its bearer token, if any.
    run_id:
        the run to create (default: ``trl-<random>``).
    sketch:
        the run's sketch spec ``{"kind", "dim", "seed"}``.  ``kind="kronecker"`` in ``sgd``
        geometry makes the client sketch per-sequence gradients with hooks without forming
        them (factorised capture) and push ``k`` floats per sequence; any other kind, and
        ``kronecker`` in ``adam`` geometry, captures exact per-sequence gradients (by
        ``capture_method``) and sketches them where ``sketch_on`` says.
    sketch_on:
        ``"trainer"``: sketch each chunk of exact rows on the trainer's device with the run's
        spec (the same rows the service would make) and push ``k`` floats per sequence;
        ``"service"``: push the raw rows; ``"auto"`` (default): the trainer when the studied
        parameters number at least :data:`TRAINER_SKETCH_MIN_PARAMETERS`, and always for
        ``kronecker``.  ``exact`` runs always push raw rows.
    geometry:
        ``"adam"``: rows ``sqrt(P_t) w_i`` with ``P_t`` the preconditioner of the step being
        taken (:func:`clients.geometry.adam_step_preconditioner`), so ``delta_h1`` predicts the
        Adam step (momentum aside); ``"sgd"``: raw score gradients (the plain-SGD
        counterfactual); ``"auto"`` (default): ``adam`` when the optimizer that steps is an
        Adam (torch's Adam or AdamW; under DeepSpeed its ``FusedAdam`` or CPU Adam,
        :func:`clients.zero.engine_optimizer`), else ``sgd``.  With ``kind="kronecker"`` the
        ``adam`` geometry captures exact rows (the factorisation ``A delta_t``, ``B x_t``
        cannot carry an elementwise ``P``): each layer's per-sequence ``G_i`` is formed in its
        hook, scaled by ``sqrt(P_t)`` and sketched as ``A G_i B^T``
        (:class:`clients.factorised.HookedCapture`): about what a count-sketched run costs
        (docs/real-run.md); ``geometry="sgd"`` keeps the cheaper factorised capture.
    parameter_filter:
        which parameters to study (default: every trainable parameter).
    capture_method:
        how exact rows are captured (every kind but ``kronecker`` in ``sgd`` geometry): ``"hooks"``
        (:class:`clients.factorised.HookedCapture`: one batched forward and backward, each
        layer's per-sequence gradients formed in its hook and sketched at once; needs rows
        sketched on the trainer), ``"vmap"`` / ``"loop"`` (``clients.capture``, a chunk of
        sequences at a time), or ``"auto"`` (default): hooks when rows are sketched on the
        trainer and hooks cover every studied parameter, else vmap, else the loop.
    chunk_size:
        sequences per chunk of exact capture: at most this many sequences' gradients exist
        at a time.
    capture_checkpointing:
        with rows from hooks, checkpoint the layers that TRL's training forward checkpoints
        (``gradient_checkpointing``, TRL's default; transformers' non-reentrant activation
        checkpointing, :class:`clients.factorised.FactorisedCapture`), so that the capture
        keeps no more activations than the training step (default True).  False keeps every
        activation of a micro-batch's capture, and saves a forward per backward of it.
    push_applied_update, push_logprob_after:
        push ``theta_after - theta_before`` and ``S'_i`` after each optimizer step.
    token_shares:
        push each update token's exact share of ``dH1`` (``cross_fit``, math.md §4 and §9,
        :func:`clients.token_shares.token_shares_cross_fit`), with its text when the trainer
        has a tokenizer, for ``GET .../tokens``.  Off by default: a forward and a backward
        over each half's sequences and one forward-mode pass over the step's sequences
        (docs/real-run.md);
        compare them with the step's ``?estimator=cross_fit`` answer; with an entropy bonus they
        include its ``e_{i,t} grad H_{i,t}`` terms.  With several processes each rank
        pushes its own sequences' shares, with the halves and directions of every rank's
        (docs/trl.md "Many ranks"); refused under FSDP2 and ZeRO 3.
    push_entropy_sums:
        push each sequence's ``sum_t H_t`` (the full next-token entropies at its positions,
        tempered as TRL's) before the step (``entropy_sum``: from the logits of the capture's
        own forward when rows are captured by hooks, else one extra forward without gradients
        per micro-batch) and, with ``push_logprob_after``, after it
        (``entropy_sum_after``, from the same forward as ``S'_i``): the token-mean entropy TRL
        logs as ``entropy`` is then predicted and its realized change measured (math.md §8).
    entropy_sum_rows:
        push each sequence's ``z_i = grad sum_t H_t`` too (``rows="entropy_sum"``): the service
        then estimates ``grad H`` from the entropy sums (math.md §3 "From the entropy sums";
        the answer's ``entropy_gradient`` reads ``entropy_sum``), whose error on exact
        enumeration is a tenth of the score-only estimate's at the same samples.  One more
        backward per micro-batch over the capture's forward (rows from hooks) or one more
        chunked capture (exact chunks), and ``k`` more floats per sequence.  Needs
        ``push_entropy_sums``.  With ``token_shares`` their directions come from the entropy
        sums too (passes of their own).  Off by default.
    check_logprobs:
        on the first micro-batch, compare the captured ``S_i`` with TRL's own log-probs and
        warn (``RuntimeWarning``) when they differ (one extra forward).
    on_push_error:
        what a push that fails after the client's retries does (the service unreachable,
        overloaded or refusing a request): ``"warn"`` (default) drops the rest of that step's
        pushes with one ``RuntimeWarning`` and lets training go on; what the step had stored
        is deleted once the service answers again (after a later step's pushes, or at the end
        of ``train()``), so that no step waits forever for this rank's sequences.  Until it
        answers, each later step first probes it (``GET /healthz``, one try of
        ``PROBE_TIMEOUT_S``) and is not pushed when the probe fails, so that a service that
        hangs costs a step one short probe, not the client's timeout times its retries.
        ``"raise"`` raises the client's error out of the training step.  The
        trainer's computation and collectives run either way, so ranks stay in step.  Creating
        the run (when the trainer is built) always raises.
    log_metrics:
        add each pushed step's answers to the trainer's own logged metrics (``report_to``:
        wandb, TensorBoard, ...), beside TRL's ``entropy``: ``kernelscope/delta_h1``,
        ``kernelscope/se_sampling``, ``kernelscope/se_sketch``,
        ``kernelscope/delta_h1_applied``, ``kernelscope/realized`` and
        ``kernelscope/realized_se`` (the default estimator; math.md §4, §6), and the same of the
        token-mean entropy TRL logs under ``kernelscope/token_mean/`` (with
        ``push_entropy_sums``).  They are logged with the step's other metrics, as TRL logs
        its own.  Off by default: the main process then waits, after each pushed step, until
        the service has it ready (at most ``LOG_WAIT_S``) and asks for two analyses, 0.02-0.04
        s per step at 64 sequences and ``k = 4096`` (docs/real-run.md).
    every_n_steps:
        capture and push optimizer steps ``0, N, 2N, ...`` only (default 1: every step).  The
        other steps run as TRL's own, at no added cost, so a long run's overhead and the
        service's memory shrink ``N`` times; its history then has a row every ``N`` steps.
    update_rows:
        push update rows ``u_i`` from TRL's own token coefficients (math.md §4 "Update rows",
        :func:`trl_token_coefficients`, one extra forward per micro-batch): ``None`` (default)
        when the coefficients differ from the on-policy ``weight_i A_i`` (a later PPO pass, the
        KL term, a mask, an importance weight; a plain on-policy micro-batch is recognised from
        its inputs without the forward), ``True`` always, ``False`` never.
    """

    url: str
    token: str | None = None
    run_id: str | None = None
    sketch: Mapping[str, Any] = field(
        default_factory=lambda: {"kind": "countsketch", "dim": 1024, "seed": 0}
    )
    parameter_filter: ParameterFilter | None = None
    sketch_on: Literal["auto", "trainer", "service"] = "auto"
    geometry: Literal["auto", "sgd", "adam"] = "auto"
    capture_method: Literal["auto", "hooks", "vmap", "loop"] = "auto"
    chunk_size: int = 8
    capture_checkpointing: bool = True
    push_applied_update: bool = True
    push_logprob_after: bool = True
    push_entropy_sums: bool = True
    token_shares: bool = False
    entropy_sum_rows: bool = False
    check_logprobs: bool = True
    on_push_error: Literal["warn", "raise"] = "warn"
    log_metrics: bool = False
    every_n_steps: int = 1
    update_rows: bool | None = None

    def __post_init__(self) -> None:
        for name in ("chunk_size", "every_n_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelscopeConfig.{name} must be an integer >= 1, got {value!r}")
        if self.entropy_sum_rows and not self.push_entropy_sums:
            raise ValueError("KernelscopeConfig.entropy_sum_rows needs push_entropy_sums")


@dataclass
class _MicroBatch:
    """One training micro-batch, kept until the step's gradient is complete: its sequence ids,
    the capture batch and TRL's token coefficients laid out like the batch's ``input_ids``
    (None: no update rows)."""

    ids: list[str]
    batch: SequenceBatch
    coefficients: TokenCoefficients | None


def _cross_fit_split(
    records: list[dict[str, Any]], ids: list[str], entropy_sums: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``([n] h_j, [n] beta_j or None, [n] int64 halves)`` of the sequences ``ids`` in the
    step whose sequences are ``records`` (``S_j`` included): the ``cross_fit`` coefficients and
    halves, computed over all of them as the service computes them (-1: a sequence without a
    half).  With ``entropy_sums`` (every record has its ``entropy_sum``) ``h`` is the entropy
    sums' ``alpha`` and ``beta`` theirs (math.md §3 "From the entropy sums")."""
    seqs = StepSequences.from_records(records)
    halves = estimator_halves(seqs, "cross_fit")
    assert halves is not None
    beta = None
    if entropy_sums:
        h, beta = entropy_sum_coefficients(seqs, seqs.update_mask, halves)
    else:
        h = estimator_entropy_coefficients(seqs, "cross_fit")
    row_of = {seq_id: row for row, seq_id in enumerate(seqs.ids)}
    rows = [row_of[i] for i in ids]
    return (
        torch.tensor([float(h[r]) for r in rows]),
        None if beta is None else torch.tensor([float(beta[r]) for r in rows]),
        torch.tensor([int(halves[r]) for r in rows], dtype=torch.int64),
    )


@dataclass
class _Window:
    """What one optimizer step (one accumulation window) has recorded so far."""

    step: int
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    micro: list[_MicroBatch] = field(default_factory=list)
    # the applied update: a snapshot of the parameters, or Adam's step counts (from its state)
    before: dict[str, torch.Tensor] | None = None
    adam_steps: dict[str, float] | None = None
    sqrt_p: Mapping[str, torch.Tensor] | None = None  # adam geometry, computed on access
    learning_rate: float | None = None  # the optimizer's rate, read before the step
    clip: float = 1.0  # what the step multiplies the window's gradient by (clipping)
    # token shares at eta = 1 (the rate is known after the step): id -> token record
    tokens: dict[str, dict[str, Any]] | None = None


class _PushAfterStep(TrainerCallback):
    """Captures the rows before ``optimizer.step()`` and pushes after it.  Under DeepSpeed the
    step is taken inside accelerate's ``backward``, before ``on_pre_optimizer_step``: the
    engine's step runs the capture first (:func:`clients.zero.call_before_step`)."""

    def __init__(self, trainer: _KernelscopeTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer._kernelscope_deepspeed:
            from clients.zero import call_before_step

            engine = self.trainer.accelerator.deepspeed_engine_wrapped.engine
            call_before_step(engine, self.trainer._kernelscope_before_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._kernelscope_save_run_id(int(state.global_step))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.trainer._kernelscope_deepspeed:
            self.trainer._kernelscope_before_step()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._kernelscope_after_step()


if TYPE_CHECKING:
    _TRLTrainer = GRPOTrainer  # what the mixin reads of TRL's trainers, as GRPO's declares it
else:
    _TRLTrainer = object


class _KernelscopeTrainer(_TRLTrainer):
    """What :class:`KernelscopeGRPOTrainer` and :class:`KernelscopeRLOOTrainer` add to TRL's
    trainer that comes after it in their MRO (both read the same generation batch: prompt and
    completion ids and masks, advantages, and TRL's per-token log-probs in their loss)."""

    @property
    def _kernelscope_loss_type(self) -> str:
        """The GRPO loss type whose on-policy weights the trainer's loss has
        (:func:`trl_sequence_weights`)."""
        return str(self.loss_type)

    def __init__(
        self,
        *args: Any,
        kernelscope: KernelscopeConfig,
        kernelscope_client: Client | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_supported(self)
        parameter_filter = kernelscope.parameter_filter
        self.kernelscope = replace(
            kernelscope, parameter_filter=self._kernelscope_language_filter(kernelscope)
        )
        kernelscope = self.kernelscope
        self.kernelscope_client = kernelscope_client or Client(
            kernelscope.url, token=kernelscope.token
        )
        self.kernelscope_run_id = self._kernelscope_shared_run_id(kernelscope.run_id)
        policy = self._kernelscope_policy()
        spec = dict(kernelscope.sketch)
        #: ``"adam"`` or ``"sgd"``: the geometry of the pushed rows (KernelscopeConfig.geometry)
        self.kernelscope_geometry = self._kernelscope_resolve_geometry()
        self._factorised: FactorisedCapture | None = None
        # kronecker in sgd geometry: factorised rows; in adam geometry the elementwise sqrt(P)
        # needs the formed G_i, and a grouped spec gives each group its own factors, which the
        # factorised capture (one dim, one seed) does not make: exact rows (hooks) sketched
        # with the run's kronecker sketcher
        if (
            spec.get("kind") == "kronecker"
            and self.kernelscope_geometry == "sgd"
            and not spec.get("groups")
        ):
            from clients.factorised import FactorisedCapture

            self._factorised = FactorisedCapture(
                policy,
                dim=int(spec["dim"]),
                seed=int(spec.get("seed", 0)),
                parameter_filter=kernelscope.parameter_filter,
                temperature=float(self.temperature),
            )
            self._factorised.checkpointing = kernelscope.capture_checkpointing
            declared = self._factorised.parameters
        else:
            declared = {
                n: list(full_shape(p))
                for n, p in select_parameters(policy, kernelscope.parameter_filter).items()
            }
        self._kernelscope_parameters = declared
        self._kernelscope_warn_unstudied(declared, vision_default=parameter_filter is None)
        self._kernelscope_warn_sampling()
        #: where exact rows are sketched: a trainer-side sketcher, or None (raw pushes)
        self.kernelscope_sketcher: Sketcher | None = self._kernelscope_trainer_sketcher(
            spec, declared
        )
        self._hooked = self._kernelscope_hooked_capture(spec, declared)
        self._kernelscope_check_sharding()
        self._kernelscope_check_router_loss()
        self._kernelscope_check_vision()
        if kernelscope.token_shares and (
            self._kernelscope_stage3 or self.accelerator.distributed_type == DistributedType.FSDP
        ):
            raise UnsupportedTRLSettingError(
                "token_shares with sharded parameters (FSDP2, ZeRO 3): the shares' forward-mode "
                "passes call the model functionally with its whole parameters; use DDP or "
                "ZeRO 1/2"
            )
        #: the run's spec as ``create_run`` takes it (a resumed run is created again with it)
        self._kernelscope_spec: dict[str, Any] = {
            "sketch": spec,
            "normalization": _RUN_NORMALIZATION.get(self._kernelscope_loss_type, "dr_grpo"),
            "geometry": self.kernelscope_geometry,
            "parameters": declared,
            "ranks": int(self.accelerator.num_processes),
            "applied_includes_step": self._kernelscope_applied_includes_step(),
        }
        self.kernelscope_client.create_run(run_id=self.kernelscope_run_id, **self._kernelscope_spec)
        self._ks_generation = 0
        self._ks_begun = False  # _kernelscope_begin has run
        #: steps whose pushes failed (_kernelscope_send), until their leftovers are deleted
        self._ks_lost: set[int] = set()
        self._ks_down = False  # a push failed, and no probe has answered since
        method = kernelscope.capture_method
        #: how exact chunks are captured: the configured method, then the one that worked
        self._ks_exact_method: Literal["auto", "vmap", "loop"] = (
            "auto" if method == "hooks" else method
        )
        self._ks_grad_norm: Any = None  # Trainer's norm before clipping, this window's
        self._ks_window: _Window | None = None
        self._ks_checked = False
        #: TRL's forward places a row's tokens after its left padding (absolute positions, as
        #: GPT-2's): the capture batches get those offsets (_kernelscope_check_logprobs)
        self._ks_padded_positions = False
        self._ks_head_checked = False  # _kernelscope_head_check has run
        self.add_callback(_PushAfterStep(self))

    # -- configuration ---------------------------------------------------------------------

    def _kernelscope_trainer_sketcher(
        self, spec: Mapping[str, Any], declared: Mapping[str, list[int]]
    ) -> Sketcher | None:
        where = self.kernelscope.sketch_on
        if self._factorised is not None or spec.get("kind") == "exact" or where == "service":
            return None
        size = sum(math.prod(shape) for shape in declared.values())
        # kronecker rows are made on the trainer at every size, as the factorised ones are
        small = size < TRAINER_SKETCH_MIN_PARAMETERS and spec.get("kind") != "kronecker"
        if where == "auto" and small:
            return None
        return build_sketcher(SketchSpec.from_dict(spec), declared)

    def _kernelscope_hooked_capture(
        self, spec: Mapping[str, Any], declared: Mapping[str, list[int]]
    ) -> HookedCapture | None:
        """The hook capture of trainer-side exact rows (``capture_method`` hooks or auto)."""
        method = self.kernelscope.capture_method
        if method in ("vmap", "loop") or self._factorised is not None:
            return None
        if self.kernelscope_sketcher is None:
            if method == "hooks":
                raise UnsupportedTRLSettingError(
                    "capture_method='hooks' sketches rows on the trainer: it needs a kind other "
                    "than exact and sketch_on='trainer' (or 'auto' above the size threshold)"
                )
            return None
        from clients.factorised import HookedCapture

        try:
            hooked = HookedCapture(
                self._kernelscope_policy(),
                spec,
                parameter_filter=self.kernelscope.parameter_filter,
                strict=True,
                temperature=float(self.temperature),
            )
        except ValueError:
            if method == "hooks":
                raise
            return None  # some parameter has no hook: exact chunks
        assert hooked.parameters == dict(declared)
        hooked.checkpointing = self.kernelscope.capture_checkpointing
        return hooked

    @property
    def _kernelscope_deepspeed(self) -> bool:
        """Whether accelerate runs the model under DeepSpeed (ZeRO 1, 2 or 3 once
        constructed)."""
        return bool(self.accelerator.distributed_type == DistributedType.DEEPSPEED)

    @property
    def _kernelscope_stage3(self) -> bool:
        """Whether DeepSpeed ZeRO 3 partitions the parameters."""
        if not self._kernelscope_deepspeed:
            return False
        return int(self.accelerator.state.deepspeed_plugin.zero_stage) == 3

    def _kernelscope_check_sharding(self) -> None:
        """Under FSDP (accelerate's ``fsdp_version=2``) the rows must come from hooks: the
        exact chunk capture calls the model functionally with its parameters, which FSDP2
        holds as shards.  Under DeepSpeed only ZeRO stages 1 and 2 are supported."""
        if self._kernelscope_deepspeed:
            from clients.zero import unsupported_reason

            plugin = self.accelerator.state.deepspeed_plugin
            reason = unsupported_reason(int(plugin.zero_stage))
            if reason is not None:
                raise UnsupportedTRLSettingError(reason)
            offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer")
            ratio = float((offload or {}).get("ratio", 1.0))
            if self.kernelscope_geometry == "adam" and self._kernelscope_stage3 and ratio < 1.0:
                raise UnsupportedTRLSettingError(
                    f"offload_optimizer.ratio = {ratio}: ZeRO 3 then steps part of the "
                    "partitions with a second Adam on the accelerator, whose state the adam "
                    "geometry does not read; offload all of the optimizer (ratio 1) or use "
                    "geometry='sgd' (delta_h1_applied still gives what the step did)"
                )
            if self._kernelscope_stage3 and self._factorised is None and self._hooked is None:
                raise UnsupportedTRLSettingError(
                    "under ZeRO stage 3 rows are captured by hooks and sketched on the "
                    "trainer: the exact chunk capture calls the model functionally with its "
                    f"parameters, which ZeRO 3 holds as partitions; {_ROWS_FROM_HOOKS}, with a "
                    "model whose studied parameters all have hooks"
                )
            return
        if self.accelerator.distributed_type != DistributedType.FSDP:
            return
        if not self.accelerator.is_fsdp2:
            raise UnsupportedTRLSettingError(
                "FSDP version 1 holds each rank's parameters (and their optimizer state) as "
                "pieces of one flattened shard, which the capture cannot map to whole "
                "parameters: use fsdp_version=2 (accelerate's FSDP2, torch's fully_shard)"
            )
        if self._factorised is None and self._hooked is None:
            raise UnsupportedTRLSettingError(
                "under FSDP rows are captured by hooks and sketched on the trainer: "
                f"{_ROWS_FROM_HOOKS}, with a model whose studied parameters all have hooks"
            )

    def _kernelscope_check_router_loss(self) -> None:
        """A mixture-of-experts model's load-balancing loss (TRL adds it with the
        architecture's ``router_aux_loss_coef`` unless told 0) is a function of the whole
        micro-batch's routing: its gradient splits into sequences given the batch's expert
        counts, which the capture by hooks has (one forward of the micro-batch), and exact
        chunks, which run a sequence at a time, do not."""
        if not getattr(self, "aux_loss_enabled", False):
            return
        coefficient = getattr(self, "router_aux_loss_coef", None)
        if self._factorised is None and self._hooked is None:
            raise UnsupportedTRLSettingError(
                f"the MoE router loss (router_aux_loss_coef = {coefficient}) is captured with "
                "rows from hooks, whose forward holds the micro-batch's expert counts; exact "
                f"chunks run a sequence at a time: {_ROWS_FROM_HOOKS}, or set "
                "router_aux_loss_coef=0 in the GRPOConfig"
            )
        if self.kernelscope.token_shares:
            raise UnsupportedTRLSettingError(
                f"token_shares with the MoE router loss (router_aux_loss_coef = {coefficient}): "
                "the part of the step the router loss makes is spread over every token's "
                "routing, prompts included, and is no completion token's share; set "
                "router_aux_loss_coef=0 in the GRPOConfig for token shares"
            )

    def _kernelscope_language_filter(self, config: KernelscopeConfig) -> ParameterFilter | None:
        """The parameter filter of a vision-language policy (TRL's ``_is_vlm``): by default its
        language side alone, the text decoder and LM head; a filter that selects a parameter
        of the vision side is refused.  The vision tower and projector run on the images'
        patches (``[patches, dim]`` rows in the model's own layout), not on the batch's
        sequences or tokens, so hooks cannot tell which sequence a row of theirs belongs to.
        A text policy's filter is returned as given."""
        if not getattr(self, "_is_vlm", False):
            return config.parameter_filter
        policy = self._kernelscope_policy()
        base: Any = getattr(policy, "get_base_model", lambda: policy)()
        language: set[int] = set()
        for part in (base.get_decoder(), base.get_output_embeddings()):
            if isinstance(part, nn.Module):
                language.update(id(p) for p in part.parameters())
        vision = [n for n, p in policy.named_parameters() if id(p) not in language]
        if config.parameter_filter is None:  # _kernelscope_warn_unstudied says what it leaves
            return ParameterFilter(exclude=tuple(vision))
        studied = [n for n in select_parameters(policy, config.parameter_filter) if n in vision]
        if studied:
            raise UnsupportedTRLSettingError(
                f"the parameter filter selects {len(studied)} parameters of the vision side of "
                f"a vision-language policy (the first: {studied[0]}): they run on the images' "
                "patches, not on the batch's sequences, and the capture cannot split their "
                "gradients by sequence; exclude them (ParameterFilter(exclude_regex=...)) or "
                "leave parameter_filter unset, which studies the text decoder and LM head"
            )
        return config.parameter_filter

    def _kernelscope_warn_unstudied(
        self, declared: Mapping[str, list[int]], vision_default: bool
    ) -> None:
        """Warn when the step moves trainable parameters that the run does not study (a
        parameter filter, peft's ``modules_to_save`` copies beside ``lora_only``, the vision
        side of a vision-language policy): the rows, ``dH1`` and ``delta_h1_applied`` cover the
        studied parameters' part of the step, the realized entropy change all of it."""
        left_out = {
            n: math.prod(full_shape(p))
            for n, p in self._kernelscope_policy().named_parameters()
            if p.requires_grad and n not in declared
        }
        if not left_out:
            return
        if getattr(self, "_is_vlm", False) and vision_default:
            hint = (
                "a vision-language policy: by default its text decoder and LM head "
                '(docs/trl.md "Vision-language models")'
            )
        else:
            hint = (
                "widen parameter_filter to study them (e.g. ParameterFilter(include_regex="
                "[r'lora_', r'\\.modules_to_save\\.']) for peft's adapters and the modules it "
                "trains whole)"
            )
        first = next(iter(left_out))
        warnings.warn(
            f"kernelscope: {len(left_out)} trainable parameters ({sum(left_out.values()):,} "
            f"values; the first: {first}) are not studied: the rows, dH1 and delta_h1_applied "
            f"cover the {len(declared)} studied ones' part of each step, the realized entropy "
            f"change every parameter the step moves; {hint}",
            UserWarning,
            stacklevel=3,
        )

    def _kernelscope_warn_sampling(self) -> None:
        """Warn when completions are drawn from a distribution other than the policy's: a
        truncated or penalised sampler (``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``
        and their like in ``generation_kwargs``) never draws some of the policy's sequences, so
        no importance weight can correct for it.  TRL's gradient, the rows and the update rows
        are still exact; the entropy estimators (``dH1`` and its error bars, the realized
        change from ``logprob_after``) average over samples assumed to come from the policy."""
        args = self._trl_args
        settings: dict[str, Any] = {
            "top_p": args.top_p,
            "top_k": args.top_k,
            "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty,
        }
        kwargs = args.generation_kwargs
        if isinstance(kwargs, Mapping):
            settings.update({k: v for k, v in kwargs.items() if k in _SAMPLER_CHANGES})
        changed = {k: v for k, v in settings.items() if v is not None and _SAMPLER_CHANGES[k](v)}
        if not changed:
            return
        named = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        warnings.warn(
            f"kernelscope: completions are sampled with {named}, not from the policy itself: "
            "TRL's gradient and the rows stay exact, but dH1, its error bars and the realized "
            "entropy change are estimated from samples assumed to come from the policy, and "
            'are biased by the truncation (docs/trl.md "Caveats")',
            UserWarning,
            stacklevel=3,
        )

    def _kernelscope_check_vision(self) -> None:
        """A vision-language micro-batch is one forward with the model's own inputs (pixel
        values, image grids ...), whose rows only the model can split by sequence: rows come
        from hooks, and token shares (forward-mode passes over sub-batches) are refused."""
        if not getattr(self, "_is_vlm", False):
            return
        if self._factorised is None and self._hooked is None:
            raise UnsupportedTRLSettingError(
                "a vision-language policy's rows are captured with hooks, over one forward of "
                "the micro-batch with its images; exact chunks run a few sequences at a time, "
                f"and only the model can split its image inputs by sequence: {_ROWS_FROM_HOOKS}"
            )
        if self.kernelscope.token_shares:
            raise UnsupportedTRLSettingError(
                "token_shares with a vision-language policy: the shares' passes run on sub-batches "
                "of a prompt's sequences, and only the model can split its image inputs by sequence"
            )

    def _kernelscope_optimizer_family(self) -> str:
        """The optimizer the steps will be taken with, read when the trainer is built (before
        DeepSpeed has made its own): ``"adam"`` (:func:`clients.geometry.is_adam_optimizer`),
        ``"sgd"`` (torch's SGD without Nesterov or dampening: momentum carries earlier steps
        only) or ``"other"``.  It is the trainer's (the one passed to it, or the one its
        arguments name) unless DeepSpeed steps with another (:func:`clients.zero.engine_optimizer`:
        a config ``optimizer`` section, or ZeRO-Offload)."""
        kwargs: Mapping[str, Any]
        if self.optimizer is not None:
            inner = adam_states(self.optimizer).optimizer
            cls, kwargs = type(inner), inner.param_groups[0]
        else:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, cast(Any, self.model))
        if self._kernelscope_deepspeed:
            from clients.zero import engine_optimizer

            plugin = self.accelerator.state.deepspeed_plugin
            replaced = engine_optimizer(plugin.deepspeed_config, cls)
            if replaced is not None:
                return replaced
        if not isinstance(cls, type):
            return "other"
        if is_adam_type(cls):
            return "adam"
        plain = not kwargs.get("nesterov", False) and not kwargs.get("dampening", 0.0)
        return "sgd" if issubclass(cls, torch.optim.SGD) and plain else "other"

    def _kernelscope_resolve_geometry(self) -> str:
        wanted = self.kernelscope.geometry
        adam = self._kernelscope_optimizer_family() == "adam"
        if wanted == "adam" and not adam:
            raise UnsupportedTRLSettingError(
                "geometry='adam' needs an Adam optimizer (torch's Adam or AdamW, DeepSpeed's "
                "FusedAdam or DeepSpeedCPUAdam)"
            )
        if wanted == "auto":
            return "adam" if adam else "sgd"
        return wanted

    def _kernelscope_applied_includes_step(self) -> bool:
        """Whether each step's applied update is the pushed rate times the sum of its update
        rows plus a part that is not a function of its sequences (the run's
        ``applied_includes_step``, math.md §4): an Adam in ``adam`` geometry (the rate
        ``lr c (1 - beta1) / (1 - beta1^t)``, the rows scaled by the step's ``sqrt(P_t)``) and
        torch's plain SGD in ``sgd`` geometry."""
        if self.kernelscope_geometry == "adam":
            return True
        return self._kernelscope_optimizer_family() == "sgd"

    def _kernelscope_shared_run_id(self, run_id: str | None) -> str:
        """The configured run id, or one drawn on the main process and shared with every rank."""
        if run_id is not None:
            return run_id
        drawn = [f"trl-{uuid.uuid4().hex[:12]}"]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(drawn, from_process=0)
        return drawn[0]

    # -- what TRL computed ----------------------------------------------------------------

    @property
    def _trl_args(self) -> Any:
        return self.args  # a GRPOConfig or an RLOOConfig (typed TrainingArguments in the base)

    def _kernelscope_policy(self) -> nn.Module:
        policy: nn.Module = self.accelerator.unwrap_model(self.model)
        return policy

    def train(  # type: ignore[override]
        self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any
    ) -> Any:
        """``GRPOTrainer.train``; resumed from a checkpoint of a run whose id was drawn (no
        ``KernelscopeConfig.run_id``), it continues that run (:meth:`_kernelscope_resume_run`)."""
        self._kernelscope_resume_run(resume_from_checkpoint)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._kernelscope_forget_lost(before=None)
        return output

    def _kernelscope_save_run_id(self, step: int) -> None:
        """Write the run's id into the checkpoint just saved (``RUN_ID_FILE``)."""
        if not self.accelerator.is_main_process:
            return
        folder = Path(str(self.args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if folder.is_dir():
            (folder / RUN_ID_FILE).write_text(json.dumps({"run_id": self.kernelscope_run_id}))

    def _kernelscope_resume_run(self, checkpoint: str | bool | None) -> None:
        """Continue the run a checkpoint was saved from: with no configured ``run_id``, the
        trainer drew one when it was built; the checkpoint's (``RUN_ID_FILE``) takes its place,
        the run is created again with this trainer's spec (a 409 if it changed) and the
        drawn run, which holds nothing yet, is deleted.  A configured ``run_id`` is kept."""
        if checkpoint is None or checkpoint is False or self.kernelscope.run_id is not None:
            return
        folder = get_last_checkpoint(self.args.output_dir) if checkpoint is True else checkpoint
        saved = Path(folder) / RUN_ID_FILE if folder else None
        if saved is None or not saved.is_file():
            return
        run_id = str(json.loads(saved.read_text())["run_id"])
        drawn, self.kernelscope_run_id = self.kernelscope_run_id, run_id
        if run_id == drawn:
            return
        self.kernelscope_client.create_run(run_id=run_id, **self._kernelscope_spec)
        if self.accelerator.num_processes > 1:  # every rank has created the drawn run
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with contextlib.suppress(NotFoundError):
                self.kernelscope_client.delete_run(drawn)

    def _kernelscope_begin(self) -> None:
        """Once, at the first generation of ``train()``, when ``state.global_step`` is what a
        checkpoint restored: a trainer resumed at step ``N > 0`` deletes the run's steps from
        ``N`` on, which an earlier attempt pushed after its checkpoint (their sequences would
        mix with this attempt's), and numbers its completions past every earlier step's
        (a step has at most ``GA`` generations, so ``N * (GA + 1)`` generations are past)."""
        self._ks_begun = True
        step = int(self.state.global_step)
        if step == 0:
            return
        accumulation = int(self._trl_args.gradient_accumulation_steps)
        self._ks_generation = max(self._ks_generation, step * (accumulation + 1))
        if self.accelerator.is_main_process:
            run = self.kernelscope_client.get_run(self.kernelscope_run_id)
            stale = sorted(s.step for s in run.steps or () if s.step >= step)
            for old in stale:
                with contextlib.suppress(NotFoundError):
                    self.kernelscope_client.delete_step(self.kernelscope_run_id, old)
            if stale:
                warnings.warn(
                    f"kernelscope: resumed at step {step}: deleted steps {stale} of run "
                    f"{self.kernelscope_run_id!r}, which an earlier attempt pushed after its "
                    "checkpoint; this attempt pushes them again",
                    UserWarning,
                    stacklevel=3,
                )
        if self.accelerator.num_processes > 1:  # no rank pushes before the deletion
            self.accelerator.wait_for_everyone()

    def _kernelscope_send(
        self, push: Callable[..., object], step: int, *args: Any, **kwargs: Any
    ) -> None:
        """``push(run_id, step, *args, **kwargs)``: one of the step's pushes.  After one has
        failed (:attr:`KernelscopeConfig.on_push_error` ``"warn"``) the step's others are
        skipped: its rows and sequences would not make a whole step.  Until the service answers
        a probe again, each later step's first push probes it and the step is skipped when it
        does not answer."""
        if step in self._ks_lost:
            return
        if self._ks_down:
            if not self.kernelscope_client.reachable(timeout=PROBE_TIMEOUT_S):
                self._ks_lost.add(step)
                return
            self._ks_down = False
            warnings.warn(
                f"kernelscope: the service answers again at step {step} of run "
                f"{self.kernelscope_run_id!r}; steps {sorted(self._ks_lost)} were not pushed, "
                "and what they stored is deleted",
                RuntimeWarning,
                stacklevel=2,
            )
        try:
            push(self.kernelscope_run_id, step, *args, **kwargs)
        except KernelscopeError as exc:
            if self.kernelscope.on_push_error == "raise":
                raise
            self._ks_lost.add(step)
            self._ks_down = True
            warnings.warn(
                f"kernelscope: step {step} of run {self.kernelscope_run_id!r} not pushed "
                f"({type(exc).__name__}: {exc}); training goes on, later steps are pushed once "
                "the service answers GET /healthz again, and what this one stored is then deleted "
                "(KernelscopeConfig.on_push_error)",
                RuntimeWarning,
                stacklevel=2,
            )

    def _kernelscope_forget_lost(self, before: int | None) -> None:
        """Delete what the lost steps (earlier than ``before``; all with None) had stored: this
        rank's sequences never arrive, so they would stay pending.  A step the service still
        does not take stays lost, to be deleted after a later step."""
        if self._ks_down and not self.kernelscope_client.reachable(timeout=PROBE_TIMEOUT_S):
            return  # the end of train() with the service still down: no waits for retries
        for step in sorted(s for s in self._ks_lost if before is None or s < before):
            try:
                self.kernelscope_client.delete_step(self.kernelscope_run_id, step)
            except NotFoundError:
                pass  # nothing was stored, or another rank deleted it
            except KernelscopeError:
                continue
            self._ks_lost.discard(step)

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        output: dict[str, Any] = super()._generate_and_score_completions(inputs)
        if self._kernelscope_policy().training:
            if not self._ks_begun:
                self._kernelscope_begin()
            # Before TRL shuffles and splits the generation batch.  TRL gathers the ranks'
            # completions in rank order, groups num_generations consecutive ones (one prompt,
            # RepeatSampler; a group may span ranks) and keeps rank r's slice
            # [r * n, (r + 1) * n).  Ids unique over the run: generation g's global completion
            # j is g * n * P + j, its group g * n * P + j // num_generations.
            n = int(output["advantages"].shape[0])
            total = n * int(self.accelerator.num_processes)
            first = int(self.accelerator.process_index) * n
            index = torch.arange(first, first + n, device=output["advantages"].device)
            offset = self._ks_generation * total
            output["kernelscope_index"] = index + offset
            output["kernelscope_group"] = index // int(self._trl_args.num_generations) + offset
            self._ks_generation += 1
        return output

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        if getattr(self, _COEFFICIENTS_PASS, False):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        captured = int(self.state.global_step) % self.kernelscope.every_n_steps == 0
        if captured and self._kernelscope_policy().training and "kernelscope_index" in inputs:
            self._kernelscope_record(inputs)
            if not self._ks_head_checked and self.accelerator.is_fsdp2:
                with self._kernelscope_head_check():
                    return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @contextlib.contextmanager
    def _kernelscope_head_check(self) -> Iterator[None]:
        """Around the first training loss under FSDP2: warn when TRL's fused LM head will read
        ``lm_head.weight`` as a sharded DTensor.  TRL's forward runs the backbone, then reads
        the head's weight without calling the head, and gathers a DTensor with
        ``full_tensor()``, whose backward keeps each rank's own gradient of its shard: the head
        is then trained on each rank's completions alone, not on their average.  accelerate
        puts the head in one FSDP unit with the backbone's final norm, which gathers it, when
        it finds that norm among the backbone's children; a vision-language model's is deeper.
        The rows follow TRL's loss, so ``dH1`` and ``delta_h1_applied`` then differ by the
        head's part of the step."""
        self._ks_head_checked = True
        policy = self._kernelscope_policy()
        head = cast(Any, policy).get_output_embeddings()
        backbone = getattr(policy, "base_model", None)
        if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module):
            yield
            return

        def check(module: nn.Module, args: Any, output: Any) -> None:
            weight = getattr(head, "weight", None)
            if weight is None or not hasattr(weight, "full_tensor"):
                return
            names = [n for n, p in policy.named_parameters() if p is weight]
            warnings.warn(
                f"kernelscope: under FSDP2 TRL's fused LM head reads {names[:1] or 'the head'} "
                "as a sharded DTensor (the head is an FSDP unit of its own that the backbone's "
                "forward does not gather) and gathers it with full_tensor(), whose backward does "
                "not average the head's gradient over the ranks: each rank trains its shard of "
                "the head on its own completions alone.  dH1 predicts the step of TRL's loss, "
                "delta_h1_applied the step taken: they differ by the head's part "
                '(docs/real-run.md "Many GPUs")',
                RuntimeWarning,
                stacklevel=4,
            )

        handle = backbone.register_forward_hook(check)
        try:
            yield
        finally:
            handle.remove()

    def _kernelscope_weights(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        items = inputs.get("num_items_in_batch")
        return trl_sequence_weights(
            self._kernelscope_loss_type,
            mask,
            gradient_accumulation_steps=int(self.current_gradient_accumulation_steps),
            max_completion_length=self.max_completion_length,
            num_items_in_batch=None if items is None else float(items),
            steps_per_generation=int(self._trl_args.steps_per_generation),
            num_processes=int(self.accelerator.num_processes),
            epsilon_high=float(self.epsilon_high),
        )

    def _kernelscope_record(self, inputs: Mapping[str, Any]) -> None:
        """Record one micro-batch: its sequences' metadata, capture batch and token
        coefficients (the rows are captured before the optimizer step)."""
        step = int(self.state.global_step)
        if self._ks_window is None or self._ks_window.step != step:
            self._ks_window = _Window(step=step)
        window = self._ks_window
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        # TRL left-pads prompts and right-pads completions; the capture wants right padding
        # (it keeps each row's real tokens in order: see SequenceBatch.from_padded).
        attention = torch.cat([prompt_mask, completion_mask], dim=1)
        batch = SequenceBatch.from_padded(
            torch.cat([prompt_ids, completion_ids], dim=1),
            attention,
            torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1).bool(),
        )
        model_inputs = {
            k: repack(inputs[k], attention) if k in _TRL_PER_TOKEN_INPUTS else inputs[k]
            for k in _TRL_MODEL_INPUTS
            if inputs.get(k) is not None
        }
        if model_inputs:
            batch = replace(batch, model_inputs=model_inputs)
        index = inputs["kernelscope_index"].tolist()
        groups = inputs["kernelscope_group"].tolist()
        ids = [f"s{i}" for i in index]
        weights = self._kernelscope_weights(inputs)
        advantages = inputs["advantages"].detach().reshape(-1).double().cpu()
        coefficients = self._kernelscope_update_layout(inputs, weights, advantages)
        if self.kernelscope.check_logprobs and not self._ks_checked:
            self._kernelscope_check_logprobs(inputs, batch)
        if self._ks_padded_positions and not batch.model_inputs:
            batch = replace(batch, position_offsets=attention.argmax(dim=1))
        for j, seq_id in enumerate(ids):
            window.records[seq_id] = {
                "id": seq_id,
                "prompt_id": f"p{groups[j]}",
                "advantage": float(advantages[j]),
                "num_tokens": int(batch.num_tokens[j]),
                "weight": float(weights[j]),
            }
        window.micro.append(_MicroBatch(ids, batch, coefficients))

    def _kernelscope_update_layout(
        self, inputs: Mapping[str, Any], weights: torch.Tensor, advantages: torch.Tensor
    ) -> TokenCoefficients | None:
        """TRL's token coefficients laid out like the capture batch's ``input_ids``, or None
        when no update rows are to be pushed (:attr:`KernelscopeConfig.update_rows`)."""
        if self.kernelscope.update_rows is False:
            return None
        if self.kernelscope.update_rows is None and self._kernelscope_plain_on_policy(inputs):
            return None
        model = self.model
        assert model is not None
        coefficients = trl_token_coefficients(self, model, inputs)
        mask = inputs["completion_mask"]
        if (
            self.kernelscope.update_rows is None
            and not coefficients.router
            and not (coefficients.entropy is not None and bool(coefficients.entropy.any()))
        ):
            on_policy = (weights.double() * advantages.to(weights.device))[:, None] * mask
            scale = float(on_policy.abs().max()) + 1e-30
            c = coefficients.logprob.double()
            if torch.allclose(c, on_policy, rtol=1e-5, atol=1e-6 * scale):
                return None
        prompt_mask = inputs["prompt_mask"]
        attention = torch.cat([prompt_mask, mask], dim=1)

        def layout(values: torch.Tensor) -> torch.Tensor:
            zeros = torch.zeros_like(prompt_mask, dtype=values.dtype)
            return repack(torch.cat([zeros, values.to(zeros.device)], dim=1), attention)

        entropy = None if coefficients.entropy is None else layout(coefficients.entropy)
        return TokenCoefficients(layout(coefficients.logprob), entropy, coefficients.router)

    def _kernelscope_plain_on_policy(self, inputs: Mapping[str, Any]) -> bool:
        """Whether TRL's loss on this micro-batch is at PPO ratio 1 with nothing but the
        sequence weights (no earlier policy's log-probs, KL term, importance weight, token mask,
        per-token advantage, entropy bonus, loss of a subclass's own): then its token
        coefficients are ``weight_i A_i`` and the forward that :func:`trl_token_coefficients`
        would spend is skipped."""
        return (
            not has_loss_of_its_own(type(self))
            and not getattr(self, "_entropy_bonus_enabled", False)
            and "old_per_token_logps" not in inputs
            and "importance_sampling_ratio" not in inputs
            and "tool_mask" not in inputs
            and inputs["advantages"].dim() == 1
            and float(self.beta) == 0.0
            and float(self.top_entropy_quantile) >= 1.0
            and self.off_policy_mask_threshold is None
            and not getattr(self, "aux_loss_enabled", False)
        )

    def _kernelscope_check_logprobs(self, inputs: Mapping[str, Any], batch: SequenceBatch) -> None:
        """Compare the capture's ``S_i`` with TRL's own per-token log-probs (on the first
        micro-batch only) and warn when they differ: then the captured gradients are not those
        of TRL's loss (e.g. dropout in TRL's forward).

        TRL runs its forward on left-padded prompts without position ids, so a model with
        absolute position embeddings (GPT-2) sees each row's tokens shifted by its padding,
        while the capture re-packs the rows without it.  A text model's check adds one more
        column of padding to TRL's forward, so that every row is shifted whatever this
        micro-batch's prompt lengths: where the capture matches it only with each row's tokens
        placed after its padding (:attr:`SequenceBatch.position_offsets`), every capture batch
        of the run is given those offsets (``_ks_padded_positions``) and nothing is said.
        """
        self._ks_checked = True
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_mask = inputs["completion_mask"]
        policy = self.accelerator.unwrap_model(self.model)
        config = getattr(policy, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        width = prompt_ids.size(1) + completion_mask.size(1)
        padded = not batch.model_inputs and (limit is None or width < int(limit))
        if padded:
            prompt_ids = torch.cat([torch.zeros_like(prompt_ids[:, :1]), prompt_ids], dim=1)
            prompt_mask = torch.cat([torch.zeros_like(prompt_mask[:, :1]), prompt_mask], dim=1)
        attention = torch.cat([prompt_mask, completion_mask], dim=1)
        temperature = float(self.temperature)
        with torch.no_grad(), self.accelerator.autocast():
            per_token, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([prompt_ids, inputs["completion_ids"]], dim=1),
                attention,
                completion_mask.size(1),
                **{k: inputs.get(k) for k in (*_TRL_MODEL_INPUTS, *_TRL_SLICE_COUNTS)},
            )
            trl_logprobs = (per_token * completion_mask).sum(dim=1).float().cpu()
            tolerance = 1e-3 * (1.0 + float(trl_logprobs.abs().max()))

            def gap(capture: SequenceBatch) -> float:
                ours = sequence_logprobs(policy, capture, temperature=temperature)
                return float((trl_logprobs - ours.float().cpu()).abs().max())

            largest = gap(batch)
            if not largest <= tolerance and padded:
                shifted = replace(batch, position_offsets=attention.argmax(dim=1))
                try:
                    shifted_gap = gap(shifted)
                except TypeError:  # a forward without position ids
                    shifted_gap = float("inf")
                if shifted_gap <= tolerance:
                    self._ks_padded_positions = True
                    if self._ks_exact_method == "vmap":  # vmap cannot take position ids
                        self._ks_exact_method = "loop"
                    return
        if not largest <= tolerance:
            warnings.warn(
                f"kernelscope: the captured log-probs differ from TRL's by up to {largest:.3g} "
                f"(tolerance {tolerance:.3g}); the pushed gradients are not those of TRL's loss. "
                "Likely causes: dropout in TRL's forward (disable_dropout=False, or dropout "
                "that the model applies from its config, as OPT does, which disable_dropout does "
                "not reach: set it to 0 in the config), or a model that places positions in a "
                'way the capture does not reproduce; see docs/trl.md "Warnings".',
                RuntimeWarning,
                stacklevel=2,
            )

    # -- around optimizer.step() -----------------------------------------------------------

    @property
    def _kernelscope_sharded(self) -> bool:
        """Whether the studied parameters are sharded (FSDP2, once accelerate has prepared the
        model) or partitioned (ZeRO 3): then the applied update is sketched from every rank's
        part, ``sqrt(P)`` gathered, and the rows must come from hooks (no fallback to exact
        chunks, which call the model with its parameters)."""
        if self._kernelscope_stage3:
            return True
        return any(is_sharded(p) for p in self._kernelscope_selected().values())

    def _kernelscope_selected(self) -> dict[str, torch.Tensor]:
        policy = self._kernelscope_policy()
        params = dict(policy.named_parameters())
        return {n: params[n] for n in self._kernelscope_parameters}

    def _kernelscope_before_step(self) -> None:
        """The step's gradient is complete (accumulated, all-reduced, clipped): capture and
        push every recorded micro-batch's rows, then snapshot the parameters."""
        window = self._ks_window
        if window is None or not window.micro:
            return
        sharded = self._kernelscope_sharded
        # Under ZeRO 1/2 the gradient and Adam's state are gathered from every rank's
        # partition (collectives): every rank reads them in the same order.
        collective = sharded or self._kernelscope_deepspeed
        assert self.optimizer is not None
        window.learning_rate = float(self.optimizer.param_groups[0]["lr"])
        window.clip = self._kernelscope_clip_factor()
        if self.kernelscope_geometry == "adam":
            selected = self._kernelscope_selected()
            window.sqrt_p = adam_step_preconditioner(self.optimizer, selected, lazy=True)
            if collective:
                # A rank's sequences' rows cover whole weights, and it holds a shard or a
                # partition of sqrt(P)'s inputs: each value is gathered when the hooks read
                # it, one at a time.
                window.sqrt_p = GatheredOnAccess(window.sqrt_p)
        # The token shares' directions come from the rows' own backward when hooks capture
        # them: in batches of whole prompts, so that each batch's h_j follow from its S_j.
        directions: list[dict[str, torch.Tensor]] | None = None
        # With several ranks a prompt's sequences are spread over them: each h_j needs every
        # rank's S first, so the directions come from passes of their own, summed over ranks
        # (_kernelscope_token_shares).
        # (The directions from the entropy sums have passes of their own too: the hooks add up
        # the score rows' part alone.)
        if (
            self.kernelscope.token_shares
            and not self.kernelscope.entropy_sum_rows
            and (self._factorised is not None or self._hooked is not None)
            and int(self.accelerator.num_processes) == 1
        ):
            window.micro = self._kernelscope_regrouped(window)
            directions = []
        # Same autocast as TRL's loss (TRL turns bf16 on by default, even on a CPU), so that
        # S_i and w_i are those of the function the step differentiates.
        with self.accelerator.autocast():
            for micro in window.micro:
                logprobs, sums = self._kernelscope_push_rows(window, micro, directions)
                for seq_id, value in zip(micro.ids, logprobs.tolist(), strict=True):
                    window.records[seq_id]["logprob"] = float(value)
                if self.kernelscope.push_entropy_sums:
                    if sums is None:  # exact chunks: their forwards keep no logits
                        _, sums = sequence_logprobs_and_entropy_sums(
                            self._kernelscope_policy(),
                            micro.batch,
                            temperature=float(self.temperature),
                        )
                    for seq_id, value in zip(micro.ids, sums.tolist(), strict=True):
                        window.records[seq_id]["entropy_sum"] = float(value)
            if self.kernelscope.token_shares:
                if self._factorised is None and self._hooked is None:
                    directions = None  # a capture fell back to exact chunks: some are missing
                window.tokens = self._kernelscope_token_shares(window, directions)
        if isinstance(window.sqrt_p, GatheredOnAccess):
            window.sqrt_p.release()
        # Every rank applies the same (all-reduced) update: the main process pushes it.  Under
        # FSDP each rank holds a shard of it: every rank sketches its shard; under ZeRO every
        # rank takes part in gathering the optimizer state it is read from.
        main = self.accelerator.is_main_process
        if self.kernelscope.push_applied_update and (main or collective):
            selected = self._kernelscope_selected()
            # an Adam: the update follows from its state after the step, so no copy of the
            # parameters is kept; under DeepSpeed that is the step of its fp32 master values,
            # elsewhere bf16 parameters round small steps away (snapshot them)
            if is_adam(self.optimizer) and (
                self._kernelscope_deepspeed
                or all(p.dtype in (torch.float32, torch.float64) for p in selected.values())
            ):
                window.adam_steps = adam_step_counts(self.optimizer, selected)
            elif self._kernelscope_stage3:  # each rank's fp32 master partition
                window.before = {n: local_partition(p).values.clone() for n, p in selected.items()}
            else:
                window.before = {n: p.detach().clone() for n, p in selected.items()}

    def _kernelscope_push_rows(
        self,
        window: _Window,
        micro: _MicroBatch,
        directions: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Capture and push one micro-batch's score rows and, with token coefficients, its
        update rows; returns the ``[n]`` ``S_i`` and, from a capture by hooks, the ``[n]``
        ``sum_t H_t`` of the same forward (None from exact chunks).  ``directions``: the
        ``cross_fit`` token shares' ``[v_0, v_1]`` that a capture by hooks adds this batch's
        part to (its batch holds whole prompts: :meth:`_kernelscope_regrouped`)."""
        from clients.factorised import EntropyDirections

        client, send, step = self.kernelscope_client, self._kernelscope_send, window.step
        coefficients = micro.coefficients
        token = None if coefficients is None else coefficients.logprob
        entropy = None if coefficients is None else coefficients.entropy
        router = 0.0 if coefficients is None else coefficients.router
        adding = None
        if directions is not None:
            adding = EntropyDirections(
                lambda logprobs: self._kernelscope_cross_fit_h(window, micro.ids, logprobs),
                directions,
            )
        sketches: FactorisedSketches | None = None
        sums_rows = self.kernelscope.entropy_sum_rows
        if self._factorised is not None:  # one forward for every kind of rows
            sketches = self._factorised.capture(
                micro.batch,
                token,
                entropy,
                directions=adding,
                router_coefficient=router,
                entropy_sum_rows=sums_rows,
            )
        elif self._hooked is not None:
            try:
                sketches = self._hooked.capture(
                    micro.batch,
                    token,
                    entropy,
                    window.sqrt_p,
                    directions=adding,
                    router_coefficient=router,
                    entropy_sum_rows=sums_rows,
                )
            except RuntimeError as exc:  # e.g. a module broadcast over the batch
                # exact chunks cannot take over a router loss (_kernelscope_check_router_loss)
                # nor a batch with image inputs (_kernelscope_check_vision)
                if (
                    self.kernelscope.capture_method == "hooks"
                    or self._kernelscope_sharded
                    or router
                    or micro.batch.model_inputs
                ):
                    raise
                warnings.warn(
                    f"kernelscope: hook capture failed ({exc}); capturing exact rows in chunks",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._hooked = None
        if sketches is not None:
            send(client.push_sketches, step, sketches.sketch, micro.ids)
            if sketches.update_sketch is not None:
                send(client.push_sketches, step, sketches.update_sketch, micro.ids, rows="update")
            if sketches.entropy_sum_sketch is not None:
                send(
                    client.push_sketches,
                    step,
                    sketches.entropy_sum_sketch,
                    micro.ids,
                    rows="entropy_sum",
                )
            return sketches.logprobs, sketches.entropy_sums
        logprobs = self._kernelscope_push_exact(window, micro, None)
        if coefficients is not None:
            self._kernelscope_push_exact(window, micro, coefficients)
        if sums_rows:  # z_i: the entropy term alone, on every response token
            on = micro.batch.response_mask.float()
            sums = TokenCoefficients(torch.zeros_like(on), on)
            self._kernelscope_push_exact(window, micro, sums, rows="entropy_sum")
        return logprobs, None

    def _kernelscope_push_exact(
        self,
        window: _Window,
        micro: _MicroBatch,
        coefficients: TokenCoefficients | None,
        rows: RowKind | None = None,
    ) -> torch.Tensor:
        """Exact rows a chunk at a time: score rows (``coefficients`` None), update rows or
        (``rows="entropy_sum"``) the entropy sums' gradients, sketched on the trainer or pushed
        raw; returns the ``[n]`` values the capture computed."""
        client, send, step = self.kernelscope_client, self._kernelscope_send, window.step
        if rows is None:
            rows = "score" if coefficients is None else "update"
        values: list[torch.Tensor] = []
        sketched: list[torch.Tensor] = []
        for span, s, gradients, used in iter_captured_chunks(
            self._kernelscope_policy(),
            micro.batch,
            parameter_filter=self.kernelscope.parameter_filter,
            method=self._ks_exact_method,
            chunk_size=self.kernelscope.chunk_size,
            token_coefficients=None if coefficients is None else coefficients.logprob,
            entropy_coefficients=None if coefficients is None else coefficients.entropy,
            temperature=float(self.temperature),
            row_scale=window.sqrt_p,
        ):
            values.append(s)
            # what worked for this model: the next chunks skip an auto attempt at vmap that
            # failed (activation checkpointing's hooks, for one), and its warning
            self._ks_exact_method = used  # type: ignore[assignment]
            if self.kernelscope_sketcher is not None:
                sketched.append(self.kernelscope_sketcher.sketch(gradients))
            else:
                send(client.push_gradients, step, gradients, micro.ids[span], rows=rows)
            del gradients  # one chunk of per-sequence gradients at a time
        if sketched:
            send(client.push_sketches, step, torch.cat(sketched), micro.ids, rows=rows)
        return torch.cat(values)

    def _kernelscope_layouts(
        self, window: _Window
    ) -> tuple[list[str], SequenceBatch, TokenCoefficients | None]:
        """The window's sequences as one batch (its micro-batches in order), with their token
        coefficients laid out like its ``input_ids`` (a plain on-policy micro-batch's
        ``weight_i A_i`` on every response token), or None when no micro-batch has any."""
        micro = window.micro
        batch = SequenceBatch.concat([m.batch for m in micro])
        ids = [i for m in micro for i in m.ids]
        if all(m.coefficients is None for m in micro):
            return ids, batch, None
        width = batch.input_ids.shape[1]

        def stacked(parts: list[torch.Tensor]) -> torch.Tensor:
            padded = [torch.nn.functional.pad(c.cpu(), (0, width - c.shape[1])) for c in parts]
            return torch.cat(padded).to(batch.input_ids.device)

        layouts = [
            self._kernelscope_on_policy(window, m.ids, m.batch)
            if m.coefficients is None
            else m.coefficients.logprob.float()
            for m in micro
        ]
        # an entropy bonus's e_{i,t} grad H_{i,t} terms are in the update rows: in the shares too
        entropies = [None if m.coefficients is None else m.coefficients.entropy for m in micro]
        bonus = None
        if any(e is not None for e in entropies):
            bonus = stacked(
                [
                    torch.zeros_like(c) if e is None else e.float()
                    for c, e in zip(layouts, entropies, strict=True)
                ]
            )
        return ids, batch, TokenCoefficients(stacked(layouts), bonus)

    @staticmethod
    def _kernelscope_on_policy(
        window: _Window, ids: list[str], batch: SequenceBatch
    ) -> torch.Tensor:
        """The token coefficients of plain on-policy sequences, ``weight_i A_i`` on every
        response token: ``[n, L]`` float32 on the CPU, laid out like ``batch.input_ids``."""
        records = window.records
        c = torch.tensor([records[i]["weight"] * records[i]["advantage"] for i in ids])
        on = batch.response_mask.cpu()
        return torch.where(on, c[:, None], torch.zeros(())).float()

    def _kernelscope_regrouped(self, window: _Window) -> list[_MicroBatch]:
        """The window's sequences in capture batches of whole prompts, each at most the size
        of the largest micro-batch (or of one prompt's sequences), trimmed of padding columns.

        TRL shuffles a generation batch before it splits it, so a prompt's sequences are
        spread over micro-batches; the ``cross_fit`` ``h_j`` of a sequence are functions of
        its prompt's ``S``, which a capture of whole prompts knows after its forward."""
        ids, batch, coefficients = self._kernelscope_layouts(window)
        size = max(m.batch.size for m in window.micro)
        prompts: dict[str, list[int]] = {}
        for row, seq_id in enumerate(ids):
            prompts.setdefault(str(window.records[seq_id]["prompt_id"]), []).append(row)
        chunks: list[list[int]] = []
        for rows in prompts.values():
            if chunks and len(chunks[-1]) + len(rows) <= size:
                chunks[-1].extend(rows)
            else:
                chunks.append(list(rows))
        out = []
        for rows in chunks:
            sub = batch.select(rows).trimmed()
            width = sub.input_ids.shape[1]
            part = None
            if coefficients is not None:
                entropy = coefficients.entropy
                part = TokenCoefficients(
                    coefficients.logprob[rows][:, :width],
                    None if entropy is None else entropy[rows][:, :width],
                )
            out.append(_MicroBatch([ids[r] for r in rows], sub, part))
        return out

    def _kernelscope_cross_fit_h(
        self, window: _Window, ids: list[str], logprobs: torch.Tensor
    ) -> torch.Tensor:
        """``[2, n]``: the ``cross_fit`` ``h_j`` of a capture batch's sequences ``ids`` (whole
        prompts) from their ``S_j`` (``logprobs``), on row ``d`` for the sequences of half
        ``d``: the weights of ``v_0`` and ``v_1``.  The same function of the same values as
        the service's (:func:`sketch.entropy.estimator_entropy_coefficients`): the other
        prompts' ``S`` are placeholders, which no ``h_j`` of these prompts depends on."""
        known = dict(zip(ids, logprobs.tolist(), strict=True))
        records = [{**r, "logprob": known.get(r["id"], 0.0)} for r in window.records.values()]
        h, _, halves = _cross_fit_split(records, ids)
        out = torch.zeros(2, len(ids))
        for column in range(len(ids)):
            if halves[column] >= 0:
                out[int(halves[column]), column] = float(h[column])
        return out

    def _kernelscope_directions_of_all_ranks(
        self, window: _Window, ids: list[str], batch: SequenceBatch
    ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        """The ``cross_fit`` ``[v_0, v_1]`` over every rank's sequences and the halves of this
        rank's ``ids`` (laid out as ``batch``), for a step whose prompts' sequences are spread
        over the ranks.  Every rank's records (``S_j`` included) are all-gathered, so ``h_j``
        and the halves are the service's, computed over all of a prompt's sequences; each rank
        adds up its own sequences' ``h_j w_j`` (a forward and a backward of its own) and one
        all-reduce per studied parameter sums them.  Every rank calls it, in the same order."""
        import torch.distributed as dist

        gathered: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [window.records[i] for i in ids])
        h, beta, halves = _cross_fit_split(
            [r for part in gathered for r in (part or [])], ids, self.kernelscope.entropy_sum_rows
        )
        members = [torch.nonzero(halves == half).flatten().tolist() for half in (0, 1)]
        local = half_directions(
            self._kernelscope_policy(),
            batch,
            members,
            h,
            max(m.batch.size for m in window.micro),
            parameters=set(self._kernelscope_parameters),
            temperature=float(self.temperature),
            use_eval_mode=True,
            beta=beta,
        )
        device = batch.input_ids.device
        directions: list[dict[str, torch.Tensor]] = [{}, {}]
        for half in (0, 1):
            # the same names in the same order on every rank, a rank without members of the
            # half adding zeros
            for name in sorted(self._kernelscope_parameters):
                shape = self._kernelscope_parameters[name]
                v = local[half].get(name)
                v = torch.zeros(shape, device=device) if v is None else v.float()
                dist.all_reduce(v)
                directions[half][name] = v
        return directions, halves

    def _kernelscope_token_shares(
        self, window: _Window, directions: list[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Every update token's share of ``dH1`` at ``eta = 1`` (``cross_fit``: the step has
        no entropy-role sequences), its log-prob and text, by sequence id (math.md §9);
        ``directions``: ``[v_0, v_1]`` from the capture's hooks, if they added them up."""
        micro = window.micro
        ids, batch, layout = self._kernelscope_layouts(window)
        if layout is None:  # plain on-policy throughout
            on_policy = self._kernelscope_on_policy(window, ids, batch)
            layout = TokenCoefficients(on_policy.to(batch.input_ids.device), None)
        coefficients, bonus = layout.logprob, layout.entropy
        records = [window.records[i] for i in ids]
        # the service's grad_hat H: from the entropy sums when the rows carry them
        h, beta, _ = _cross_fit_split(records, ids, self.kernelscope.entropy_sum_rows)
        halves = None
        if int(self.accelerator.num_processes) > 1:
            directions, halves = self._kernelscope_directions_of_all_ranks(window, ids, batch)
        result = token_shares_cross_fit(
            self._kernelscope_policy(),
            batch,
            ids,
            [str(r["prompt_id"]) for r in records],
            coefficients,
            h,
            1.0,
            parameters=set(self._kernelscope_parameters),
            sqrt_p=window.sqrt_p,
            temperature=float(self.temperature),
            entropy_coefficients=bonus,
            # no pass holds more sequences than TRL's own micro-batches
            chunk_size=max(m.batch.size for m in micro),
            directions=directions or None,
            halves=halves,
            beta=beta,
        )
        tokenizer = getattr(self, "processing_class", None)
        out: dict[str, dict[str, Any]] = {}
        for row, seq_id in enumerate(ids):
            mask = batch.response_mask[row]
            token_ids = batch.input_ids[row][mask].tolist()
            texts = None
            if tokenizer is not None and hasattr(tokenizer, "decode"):
                texts = [str(tokenizer.decode([t])) for t in token_ids]
            out[seq_id] = {
                "id": seq_id,
                "token_ids": token_ids,
                "tokens": texts,
                "logprobs": result.logprobs[row][mask.cpu()].tolist(),
                "shares": result.shares[row][mask.cpu()].tolist(),
            }
        return out

    def _clip_grad_norm(self, model: Any) -> Any:
        """``Trainer``'s clipping (``max_grad_norm > 0``), which returns the norm before it:
        kept for :meth:`_kernelscope_clip_factor`."""
        norm = super()._clip_grad_norm(model)
        self._ks_grad_norm = norm
        return norm

    def _kernelscope_clip_factor(self) -> float:
        """What the step multiplies this window's gradient by: ``Trainer``'s (torch's)
        ``min(1, max_grad_norm / (norm + 1e-6))`` on the norm it clipped with, or DeepSpeed's
        own (:func:`clients.zero.clip_factor`, its step clips); 1 without clipping."""
        if self._kernelscope_deepspeed:
            from clients.zero import clip_factor, zero_optimizer

            zero = zero_optimizer(self.optimizer)
            return 1.0 if zero is None else clip_factor(zero)
        norm, self._ks_grad_norm = self._ks_grad_norm, None
        max_norm = float(self.args.max_grad_norm or 0.0)
        if norm is None or max_norm <= 0.0:
            return 1.0
        if is_sharded(norm):  # FSDP2: a replicated DTensor
            norm = norm.full_tensor()
        return min(1.0, max_norm / (float(norm) + 1e-6))

    def _current_learning_rate(self, window: _Window) -> float:
        """``eta`` of ``dH1 = eta h^T K c``: the optimizer's rate read before the step (a
        DeepSpeed engine steps the scheduler inside its own step) times the factor gradient
        clipping scaled the window's gradient by (``window.clip``); in ``adam`` geometry times the
        share of the step's own gradient in Adam's momentum, ``(1 - beta1) / (1 - beta1^t)``,
        so that ``delta_h1`` is the change due to this step's sequences and ``delta_h1_applied
        - delta_h1`` what the momentum carried in (docs/trl.md "Geometry")."""
        assert self.optimizer is not None and window.learning_rate is not None
        rate = window.learning_rate * window.clip
        if self.kernelscope_geometry == "adam":
            rate *= adam_gradient_share(self.optimizer, self._kernelscope_selected())
        return rate

    def _kernelscope_applied_update(
        self, window: _Window
    ) -> Iterator[tuple[str, torch.Tensor | FlatRange]]:
        """``(name, u)`` of the step just taken, one parameter at a time in name order (the
        order a sketch adds them in); ``u / sqrt(P)`` in adam geometry, so that ``<sqrt(P) w_j,
        u / sqrt(P)> = <w_j, u>``."""
        selected = self._kernelscope_selected()
        selected = {n: selected[n] for n in sorted(selected)}
        if self._kernelscope_stage3:
            yield from self._kernelscope_partition_update(window, selected)
            return
        if window.adam_steps is not None:
            assert self.optimizer is not None
            parts = adam_applied_update(self.optimizer, selected, window.adam_steps)
        else:
            assert window.before is not None
            before = window.before
            parts = ((n, (p.detach() - before[n]).float()) for n, p in selected.items())
        # adam geometry: the step's sqrt(P_t), read back from the state after it
        scale = None
        if window.sqrt_p is not None:
            assert self.optimizer is not None
            scale = adam_taken_preconditioner(self.optimizer, selected, lazy=True)
        for name, u in parts:
            yield name, u if scale is None else unscaled(u, scale[name])

    def _kernelscope_partition_update(
        self, window: _Window, selected: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, FlatRange]]:
        """Under ZeRO 3: this rank's flat range of each parameter's ``u`` (``u / sqrt(P)`` in
        adam geometry), from its fp32 master partition: after the step minus before it, or
        from the Adam state after the step (:func:`clients.geometry.adam_state_update`, no
        copy of the parameters kept).  The ``sqrt(P)`` are gathered (collectives, in name order
        on every rank), the updates not."""
        assert self.optimizer is not None
        states = adam_states(self.optimizer) if window.adam_steps is not None else None
        scale = None
        if window.sqrt_p is not None:
            scale = adam_taken_preconditioner(self.optimizer, selected, lazy=True)
        for name, p in selected.items():
            part = local_partition(p)
            if states is None:
                assert window.before is not None
                u = part.values.float() - window.before[name].float()
            else:
                assert window.adam_steps is not None
                group = states.group(p)
                assert group is not None
                update = adam_state_update(  # calls value and read before the loop moves on
                    group,
                    states.state(p),
                    window.adam_steps[name],
                    value=lambda: part.values,  # noqa: B023
                    read=lambda key: local_partition(p, key).values,  # noqa: B023
                )
                u = torch.zeros_like(part.values, dtype=torch.float32) if update is None else update
            if scale is not None:
                flat = scale[name].reshape(-1)
                u = unscaled(u, flat[part.offset : part.offset + u.numel()])
            yield name, FlatRange(u, part.offset, part.group)

    def _kernelscope_after_step(self) -> None:
        window = self._ks_window
        if window is None or not window.records:
            return
        client, send = self.kernelscope_client, self._kernelscope_send
        if window.before is not None or window.adam_steps is not None:
            sketcher = (
                self._factorised.sketcher
                if self._factorised is not None
                else self.kernelscope_sketcher
            )
            parts = self._kernelscope_applied_update(window)
            if sketcher is None:  # raw rows: never sharded (refused at construction)
                update = {n: u for n, u in parts if isinstance(u, torch.Tensor)}
                if self.accelerator.is_main_process:
                    send(client.push_applied_update, window.step, update)
            else:  # k floats, like the rows, instead of N; one parameter's update at a time
                sketch = sketch_of_whole(sketcher, parts)  # of every rank's shards (FSDP2, ZeRO 3)
                if self.accelerator.is_main_process:
                    send(client.push_applied_update, window.step, sketch=sketch)
        records = list(window.records.values())
        if self.kernelscope.push_logprob_after:
            policy = self._kernelscope_policy()
            after: dict[str, dict[str, float]] = {}
            for micro in window.micro:
                with self.accelerator.autocast():
                    values, sums = sequence_logprobs_and_entropy_sums(
                        policy, micro.batch, temperature=float(self.temperature)
                    )
                for i, value, total in zip(micro.ids, values.tolist(), sums.tolist(), strict=True):
                    after[i] = {"logprob_after": float(value)}
                    if self.kernelscope.push_entropy_sums:
                        after[i]["entropy_sum_after"] = float(total)
            records = [{**r, **after[r["id"]]} for r in records]
        max_length = (
            self.max_completion_length if self._kernelscope_loss_type == "dr_grpo" else None
        )
        # Last, after this rank's rows: the step is ready once every rank has reported.
        ranks = int(self.accelerator.num_processes)
        rate = self._current_learning_rate(window)
        send(
            client.push_sequences,
            window.step,
            rate,
            records,
            max_length=max_length,
            rank=int(self.accelerator.process_index) if ranks > 1 else None,
        )
        if window.tokens:
            tokens = [
                {**t, "shares": [rate * a for a in t["shares"]]} for t in window.tokens.values()
            ]
            send(client.push_tokens, window.step, rate, tokens, estimator="cross_fit")
        self._ks_window = None
        if self._ks_lost and window.step not in self._ks_lost:  # the service answers again
            self._kernelscope_forget_lost(before=window.step)
        if (
            self.kernelscope.log_metrics
            and self.accelerator.is_main_process
            and window.step not in self._ks_lost
        ):
            self._kernelscope_log(window.step)

    def _kernelscope_log(self, step: int) -> None:
        """Add the pushed ``step``'s answers to TRL's metrics of this step (``log_metrics``),
        once the service has it ready: every rank has pushed its sequences before it moves on
        to the next step, so the wait cannot hold up a collective."""
        client, run_id = self.kernelscope_client, self.kernelscope_run_id
        try:
            # the first analysis waits on the service's side for the step to be ready, or,
            # where the service allows shorter waits (KERNELSCOPE_MAX_WAIT_S), polls its status
            try:
                sequence = client.entropy(run_id, step, target="sequence", wait=LOG_WAIT_S)
            except ValidationError:
                client.wait_ready(run_id, step, timeout=LOG_WAIT_S)
                sequence = client.entropy(run_id, step, target="sequence")
            reports = {"kernelscope/": sequence}
            if self.kernelscope.push_entropy_sums:
                token_mean = client.entropy(run_id, step, target="token_mean")
                reports["kernelscope/token_mean/"] = token_mean
        except KernelscopeError as exc:
            warnings.warn(
                f"kernelscope: step {step} of run {run_id!r} is pushed but its answers are not "
                f"logged ({type(exc).__name__}: {exc})",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        metrics = self._metrics["train"]
        for prefix, report in reports.items():
            realized = report.realized or {}
            values = {
                "delta_h1": report.delta_h1,
                "se_sampling": report.se_sampling,
                "se_sketch": report.se_sketch,
                "delta_h1_applied": report.delta_h1_applied,
                "realized": realized.get("delta_h"),
                "realized_se": realized.get("se"),
            }
            for key, value in values.items():
                if value is not None:
                    metrics[prefix + key].append(float(value))


class KernelscopeGRPOTrainer(_KernelscopeTrainer, GRPOTrainer):
    """``trl.GRPOTrainer`` that pushes every optimizer step to kernelscope.

    Same constructor as ``GRPOTrainer`` plus ``kernelscope`` (a :class:`KernelscopeConfig`)
    and, optionally, ``kernelscope_client`` (a ready :class:`clients.http.Client`).  The
    service's step number is ``state.global_step`` at the time of the optimizer step (0, 1,
    ...).  The run's id is :attr:`kernelscope_run_id`.

    Each micro-batch's sequences are recorded in ``compute_loss``; their rows are captured once
    the step's gradient is complete, just before ``optimizer.step()`` (the parameters do not
    move within an accumulation window, so the rows are the same, and the Adam preconditioner
    of the step is known then).
    """


# the two trainers' generation helpers differ in their signatures, which the mixin never calls
class KernelscopeRLOOTrainer(_KernelscopeTrainer, RLOOTrainer):  # type: ignore[misc]
    """``trl.RLOOTrainer`` that pushes every optimizer step to kernelscope: the constructor,
    configuration and answers of :class:`KernelscopeGRPOTrainer`.

    RLOO's loss on a micro-batch of ``b`` completions is ``-mean_i min(r_i A_i, clip(r_i)
    A_i)`` with the sequence ratio ``r_i = exp(S_i - S_i^old)`` and the leave-one-out
    advantage ``A_i`` (its KL penalty, with ``beta``, is part of the reward: a constant of the
    loss).  The Trainer divides it by the accumulation steps, and DDP averages the ranks: at
    ratio 1 its weights are ``1 / (b GA P)``, those of GRPO's ``luspo``.  RLOO passes the
    generation's ``old_logps`` on every pass, so its inputs do not tell whether the policy
    has moved since they were computed: its micro-batch counter does
    (:meth:`_kernelscope_plain_on_policy`).  Elsewhere the token coefficients are taken (one
    forward per micro-batch), and where they equal ``weight_i A_i`` no update rows are pushed.
    """

    @property
    def _kernelscope_loss_type(self) -> str:
        return "luspo"

    def _kernelscope_plain_on_policy(self, inputs: Mapping[str, Any]) -> bool:
        """Whether no optimizer step has been taken since this micro-batch's completions and
        their ``old_logps`` were generated: then its ratio is 1 (to float precision) and its
        coefficients are ``weight_i A_i``.  RLOO generates at every ``steps_per_generation *
        num_iterations``-th micro-batch (its ``_step`` counts them) and the Trainer steps
        every ``GA``-th.  A resumed run generates afresh at its first micro-batch, where its
        ``_step`` starts again at 0.  Without that private counter (another TRL) the answer is
        no: the coefficients, taken by autograd, are right either way, at one forward more."""
        if has_loss_of_its_own(type(self)) or getattr(self, "aux_loss_enabled", False):
            return False
        micro = getattr(self, "_step", None)
        if not isinstance(micro, int):  # a TRL without this private counter: take coefficients
            return False
        ga = int(self.args.gradient_accumulation_steps)
        every = int(self._trl_args.steps_per_generation) * int(self.num_iterations)
        return (micro - micro % every) // ga == micro // ga
