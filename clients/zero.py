"""Runs under DeepSpeed ZeRO stages 1, 2 and 3 (accelerate's DeepSpeed plugin): where the
step's gradient and Adam's state are, and when the step is taken.

ZeRO 1 and 2 keep every parameter whole on every rank, as DDP does, but the reduced gradient
and the optimizer's state are flat fp32 partitions, one range per rank
(``DeepSpeedZeroOptimizer``; its torch ``Adam`` / ``AdamW`` steps the partitions).  A
parameter's ``.grad`` is empty at the step, so :class:`ZeroAdamStates` reads the whole
gradient and state of one parameter at a time from the ranks' partitions (DeepSpeed's
``safe_get_full_grad`` and its fragment addresses; one all-reduce of the parameter's size
each: every rank reads the same parameters in the same order).

With bf16 parameters and fp32 gradient accumulation, stage 1 steps with DeepSpeed's
``BF16_Optimizer`` instead, which keeps the whole fp32 gradient on every rank and the fp32
master values and state in partitions linked the same way: :class:`ZeroAdamStates` reads it
too.

ZeRO 3 partitions the parameters too: rank ``r`` holds one flat range of each, and
DeepSpeed's module hooks gather a module's parameters around its forward and backward, the
capture's included.  The gradient and state are all-gathered as under ZeRO 1/2
(:class:`Zero3AdamStates`); the applied update is taken on each rank's range of the fp32
master values and sketched there (:func:`local_partition`, ``clients.shards.FlatRange``); the
hooks that re-run a module (norms, a MoE layer's router and experts) read its parameters'
values when its output's gradient arrives, after DeepSpeed has gathered them for the module's
backward (``clients.factorised``).

Two differences from torch's own loop that the trainer follows (math.md §1, docs/trl.md):

* **clipping** happens inside the step: the gradient Adam sees is the reduced one times
  :func:`clip_factor` (DeepSpeed's formula on its own global norm);
* **the step is taken inside accelerate's ``backward``** of the window's last micro-batch
  (``DeepSpeedEngineWrapper.backward`` calls ``engine.step()``), before ``Trainer`` calls the
  callbacks' ``on_pre_optimizer_step``, and the optimizer's own ``step()`` is a no-op:
  :func:`call_before_step` runs a function just before the engine's step instead.

Stage 0 (the engine clips ``.grad`` in its step, after the point where the rows are scaled)
is not handled: :func:`unsupported_reason` says why.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from clients.geometry import AdamStates
from clients.shards import FlatRange

#: ``DeepSpeedEngine`` attribute that marks a wrapped ``step`` (so it is wrapped once).
_WRAPPED = "_kernelscope_wrapped_step"


def zero_optimizer(optimizer: Any) -> Any | None:
    """The ZeRO optimizer (``DeepSpeedZeroOptimizer``, stage 1 or 2;
    ``DeepSpeedZeroOptimizer_Stage3``; or ``BF16_Optimizer``, which the engine uses for stage
    1 with bf16 parameters and fp32 gradient accumulation) inside ``optimizer`` (accelerate's
    wrapper or the engine's own), or None (another optimizer, or DeepSpeed not imported)."""
    if "deepspeed" not in sys.modules:  # then no optimizer is DeepSpeed's; importing it is slow
        return None
    try:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return None
    kinds = DeepSpeedZeroOptimizer | DeepSpeedZeroOptimizer_Stage3 | BF16_Optimizer
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        if isinstance(candidate, kinds):
            return candidate
    return None


def is_bf16_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` (a :func:`zero_optimizer`) is DeepSpeed's ``BF16_Optimizer``."""
    return hasattr(optimizer, "fp32_groups_flat_partition")


def is_stage3(optimizer: Any) -> bool:
    """Whether ``optimizer`` (a :func:`zero_optimizer`) is ZeRO stage 3's."""
    return hasattr(optimizer, "fp32_partitioned_groups_flat")


def unsupported_reason(stage: int) -> str | None:
    """Why a ZeRO ``stage`` cannot be attached to (None for stages 1, 2 and 3)."""
    if stage not in (1, 2, 3):
        return (
            f"DeepSpeed ZeRO stage {stage}: the engine clips the gradient inside its step, "
            "after the rows are scaled by the step's preconditioner; use ZeRO stage 1, 2 or 3 "
            "(or plain DDP)"
        )
    return None


def engine_optimizer(config: Mapping[str, Any], trainer_optimizer: type) -> str | None:
    """What a DeepSpeed engine made from ``config`` steps with instead of the trainer's own
    optimizer (of class ``trainer_optimizer``): ``"adam"`` (one of DeepSpeed's Adams or
    torch's, ``clients.geometry.is_adam_optimizer``), ``"other"`` (another of DeepSpeed's), or
    None (the trainer's own).

    * With an ``optimizer`` section, DeepSpeed builds the optimizer from it (``Trainer`` passes
      a placeholder): type Adam or AdamW gives ``FusedAdam``, its CPU Adam under ZeRO-Offload,
      or torch's with ``torch_adam``.
    * Without one, under ZeRO-Offload of the optimizer, accelerate replaces the trainer's
      optimizer by DeepSpeed's CPU Adam, whatever it was (``map_pytorch_optim_to_deepspeed``;
      Adagrad by a CPU Adagrad and bitsandbytes' Lion by a CPU Lion), unless the config sets
      ``zero_force_ds_cpu_optimizer`` to false."""
    section = config.get("optimizer")
    if section:
        kind = str(section.get("type", "")).lower()
        return "adam" if kind in ("adam", "adamw") else "other"
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {})
    if offload.get("device", "none") in (None, "none"):
        return None
    if not config.get("zero_force_ds_cpu_optimizer", True):
        return None
    name = trainer_optimizer.__name__.lower()
    return "other" if "adagrad" in name or "lion" in name else "adam"


def call_before_step(engine: Any, before: Callable[[], None]) -> None:
    """Make ``engine.step()`` call ``before()`` first (then the window's parameters and reduced
    gradient are the step's), then the engine's own step.  Once per engine: calling it again
    on the same engine does nothing."""
    if getattr(engine, _WRAPPED, False):
        return
    original = engine.step

    def step(*args: Any, **kwargs: Any) -> Any:
        before()
        return original(*args, **kwargs)

    engine.step = step
    setattr(engine, _WRAPPED, True)


def _whole(parameter: torch.Tensor, partition_value: torch.Tensor) -> torch.Tensor:
    """The whole of a per-parameter quantity held in the ranks' flat partitions
    (``partition_value``, e.g. Adam's ``exp_avg_sq`` of this rank's partition), float32 in
    the parameter's shape: this rank's fragment in place, zeros elsewhere, one all-reduce
    over the parameter's data-parallel group (DeepSpeed's ``get_full_hp_param``)."""
    # on the parameter's device, as DeepSpeed's ``get_full_hp_param``: under ZeRO-Offload the
    # partition is in host memory, which NCCL cannot reduce
    whole = torch.zeros(parameter.numel(), dtype=torch.float32, device=parameter.device)
    mapping = getattr(parameter, "_hp_mapping", None)
    if mapping is not None:  # None: no part of this parameter is in this rank's partition
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        whole.narrow(0, lp.start, lp.numel).copy_(partition_value.narrow(0, hp.start, hp.numel))
    dist.all_reduce(whole, group=parameter._dp_group)  # type: ignore[attr-defined]
    return whole.view(parameter.shape)


class _FullState(Mapping[str, Any]):
    """One parameter's optimizer state as torch's Adam keeps it for a whole parameter: each
    tensor of the partition's state (``partition_state``) gathered by ``gather(key, value)``
    when read, ``step`` as is."""

    def __init__(
        self,
        partition_state: Mapping[str, Any],
        gather: Callable[[str, torch.Tensor], torch.Tensor],
    ) -> None:
        self._partition = partition_state
        self._gather = gather

    def __getitem__(self, key: str) -> Any:
        value = self._partition[key]
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return self._gather(key, value)
        return value

    def __contains__(self, key: object) -> bool:  # without gathering
        return key in self._partition

    def __iter__(self) -> Iterator[str]:
        return iter(self._partition)

    def __len__(self) -> int:
        return len(self._partition)


def clip_factor(optimizer: Any) -> float:
    """What a ZeRO 1/2 ``optimizer``'s step multiplies the window's gradient by (the loss scale
    aside): ``1 / max(1, (norm / loss_scale + 1e-6) / clip)`` as ``unscale_and_clip_grads``
    computes it, ``norm`` its own global norm of the reduced gradient (one all-reduce); 1
    without clipping.  Call it between the window's last backward and the engine's step."""
    clip = float(optimizer.clip_grad)
    if clip <= 0.0:
        return 1.0
    if is_bf16_optimizer(optimizer):  # its step: clip_tensors_by_global_norm, no loss scale
        return min(1.0, clip / (_bf16_global_norm(optimizer) + 1e-6))
    loss_scale = float(optimizer.loss_scale)
    if is_stage3(optimizer):  # as its step computes it
        from deepspeed.runtime.utils import combine_grad_norm_groups

        norm = float(combine_grad_norm_groups(optimizer._get_norm_groups()))
    else:
        norm = float(optimizer.scaled_global_norm())
    if not math.isfinite(norm) or norm < 0:  # DeepSpeed skips such a step
        norm = math.inf
    return 1.0 / max(1.0, (norm / loss_scale + 1e-6) / clip)


def _bf16_global_norm(optimizer: Any) -> float:
    """``BF16_Optimizer``'s global norm of the window's fp32 gradient, as its step computes it
    (inf where it is not finite: the step is then skipped)."""
    from deepspeed.runtime.utils import get_global_norm_of_tensors, get_norm_with_moe_layers

    grads, experts = optimizer.get_grads_for_norm()
    norm = get_global_norm_of_tensors(grads, mpu=optimizer.mpu, norm_type=optimizer.norm_type)
    if optimizer.has_moe_layers:
        norm = get_norm_with_moe_layers(
            norm, mpu=optimizer.mpu, expert_tensors=experts, norm_type=optimizer.norm_type
        )
    value = float(norm)
    return value if math.isfinite(value) and value >= 0 else math.inf


class ZeroAdamStates(AdamStates):
    """Each parameter's Adam hyperparameters, state and step gradient under ZeRO stage 1/2,
    laid out as for a whole parameter.

    ``state(p)`` gathers a tensor when it is read and ``gradient(p)`` gathers the reduced
    gradient, scaled as the step will scale it (call it between the window's last backward
    and the engine's step: DeepSpeed frees the partitions' gradients in the step)."""

    def __init__(self, optimizer: Any) -> None:
        # not ``super().__init__``: its map of torch's groups keys the flat partitions, and
        # ``group`` below maps a parameter through DeepSpeed's own groups instead
        #: the torch optimizer, stepping the flat partitions
        self.optimizer = optimizer.optimizer
        self.zero = optimizer
        bf16 = is_bf16_optimizer(optimizer)
        groups = optimizer.bf16_groups if bf16 else optimizer.bit16_groups
        self._group_index = {id(p): i for i, group in enumerate(groups) for p in group}
        #: each group's fp32 partition on this rank, the tensor its torch optimizer steps
        self._partitions: list[torch.Tensor] = (
            optimizer.fp32_groups_flat_partition
            if bf16
            else optimizer.single_partition_of_fp32_groups
        )
        self._scale: float | None = None

    def group(self, parameter: torch.Tensor) -> Mapping[str, Any] | None:
        index = self._group_index.get(id(parameter))
        return None if index is None else self.hyperparameters(self.optimizer.param_groups[index])

    def state(self, parameter: torch.Tensor) -> Mapping[str, Any]:
        index = self._group_index.get(id(parameter))
        if index is None:
            return {}
        partition = self._partitions[index]
        # the partition's own state, not ``safe_get_full_optimizer_state``: DeepSpeed links a
        # parameter to its state once, after the first group's first step, so with several
        # parameter groups (``Trainer``'s decay and no-decay) the later groups are never
        # linked (deepspeed 0.19)
        return _FullState(
            self.optimizer.state.get(partition, {}),
            lambda _key, value: _whole(parameter, value),
        )

    def value(self, parameter: torch.Tensor) -> torch.Tensor:
        """The whole fp32 master value the step updates, gathered from the partitions (the
        parameter itself may be bf16)."""
        index = self._group_index.get(id(parameter))
        if index is None:
            return parameter.detach()
        return _whole(parameter, self._partitions[index])

    def gradient_scale(self) -> float:
        """What the step divides the reduced gradient by: DeepSpeed's ``combined_scale`` of
        ``unscale_and_clip_grads``, the loss scale over :func:`clip_factor` (one all-reduce)."""
        if self._scale is None:
            loss_scale = float(getattr(self.zero, "loss_scale", 1.0))  # BF16_Optimizer: none
            self._scale = loss_scale / clip_factor(self.zero)
        return self._scale

    def reduced_gradient(self, parameter: torch.Tensor) -> torch.Tensor | None:
        """The whole reduced gradient, gathered from the partitions, before the step scales
        it."""
        from deepspeed.utils import safe_get_full_grad

        g: torch.Tensor | None = safe_get_full_grad(parameter)
        return g

    def gradient(self, parameter: torch.Tensor) -> torch.Tensor | None:
        scale = self.gradient_scale()
        g = self.reduced_gradient(parameter)
        if g is None:
            return None
        # as DeepSpeed scales it: times the reciprocal, in float32
        return g.float() if scale == 1.0 else g.float().mul(1.0 / scale)


class Zero3AdamStates(ZeroAdamStates):
    """:class:`ZeroAdamStates` under ZeRO stage 3 (``DeepSpeedZeroOptimizer_Stage3``): each
    parameter's partition lies in a flat fp32 sub-group (``grad_position``), whose torch
    param group is ``sub_group_to_group_id``; the whole gradient and state are all-gathered
    from the partitions (DeepSpeed's ``get_fp32_grad_for_param`` and ``get_full_hp_param``),
    one parameter at a time."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer.optimizer
        self.zero = optimizer
        self._scale: float | None = None

    def _sub_group(self, parameter: torch.Tensor) -> int | None:
        position = self.zero.grad_position.get(self.zero.get_param_id(parameter))
        return None if position is None else int(position[0])

    def group(self, parameter: torch.Tensor) -> Mapping[str, Any] | None:
        sub = self._sub_group(parameter)
        if sub is None:
            return None
        return self.hyperparameters(
            self.optimizer.param_groups[self.zero.sub_group_to_group_id[sub]]
        )

    def state(self, parameter: torch.Tensor) -> Mapping[str, Any]:
        sub = self._sub_group(parameter)
        if sub is None:
            return {}
        flat = self.zero.fp32_partitioned_groups_flat[sub]
        return _FullState(
            self.optimizer.state.get(flat, {}),
            lambda key, _value: self.zero.get_full_hp_param(parameter, key).float(),
        )

    def reduced_gradient(self, parameter: torch.Tensor) -> torch.Tensor | None:
        g: torch.Tensor | None = self.zero.get_fp32_grad_for_param(parameter)
        return g

    def value(self, parameter: torch.Tensor) -> torch.Tensor:
        whole: torch.Tensor = self.zero.get_full_hp_param(parameter)
        return whole


def local_partition(parameter: torch.Tensor, state: str | None = None) -> FlatRange:
    """This rank's part of a ZeRO 3 ``parameter``'s fp32 master value, or of its optimizer
    ``state`` (``exp_avg``, ...), as a view without the partition's padding: rank ``r`` of the
    parameter's partition group holds ``[r * size, (r + 1) * size)`` of the flattened whole
    (DeepSpeed's ``_partition_param``), the last ranks less or nothing."""
    zero = parameter._z3_optimizer  # type: ignore[attr-defined]
    values: torch.Tensor = zero.get_local_fp32_param(parameter, state)
    start = values.numel() * zero._get_param_partition_rank(parameter)
    numel = int(parameter.ds_numel)  # type: ignore[attr-defined]
    length = max(0, min(values.numel(), numel - start))
    return FlatRange(values.narrow(0, 0, length), start, zero._get_param_partition_group(parameter))
