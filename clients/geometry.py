"""Adam geometry and the real optimizer step (math.md §1).

In ``adam`` geometry a run's rows are ``sqrt(P) * w_i`` (elementwise) with

    P = 1 / (sqrt(v_hat) + eps),     v_hat = v / (1 - beta2^t),     P = 0 where v = 0,

``v`` the optimizer's second-moment state (``exp_avg_sq``, or ``max_exp_avg_sq`` with amsgrad)
and ``t`` its step count; the kernel of the scaled rows is ``K(i, j) = w_i^T P w_j``, the
preconditioned Fisher kernel that first-order predictions need when the update is
``eta * P * g_hat`` (momentum ignored).  This is exactly the denominator ``torch.optim.Adam`` /
``AdamW`` divide by, so with ``beta1 = 0`` and no weight decay the step taken is
``-lr * P * g``.  Where ``v = 0`` (no gradient yet, this step's included) Adam divides by
``eps`` alone, but its gradient term there is 0: it moves such a coordinate by decoupled weight
decay only.  ``P`` is 0 there instead of ``1 / eps``, so that rows that are not exactly 0 there
are not multiplied by ``1 / eps``: a gradient reduced in bf16 cancels to exactly 0 in a few
coordinates where the rows' sum does not (docs/real-run.md "Mixed precision").

Which ``v``: ``P`` is read from the optimizer's state when :func:`adam_preconditioner` is
called.  Call it after ``optimizer.step()`` to use the ``v_t`` that the step just used (the
``w_i`` themselves are the gradients at the parameters before the step, captured earlier);
before the first step the state is empty and the function raises.

The applied update ``u = theta_after - theta_before`` (:class:`AppliedUpdateCapture`) is the
step really taken (momentum, clipping, weight decay included).  In ``adam`` geometry it is sent
as ``u / sqrt(P)`` so that ``<sqrt(P) w, u / sqrt(P)> = <w, u>``: the row with the reserved id
``__applied_update__`` then gives ``<w_j, u>`` against every sketched row, over the coordinates
with ``v > 0`` (the others' weight decay is left out, :func:`unscaled`).

Under FSDP2 (:mod:`clients.shards`) each value is computed from this rank's shards of the
parameter, gradient and state, and is sharded like the parameter.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn

from clients.capture import SequenceBatch, sequence_logprobs
from clients.filters import ParameterFilter, select_parameters
from clients.shards import UnsupportedShardingError, is_sharded, like, local
from sketch.names import APPLIED_UPDATE_ID as APPLIED_UPDATE_ID


def _step_count(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself, also when accelerate wraps it (``.optimizer``)."""
    inner: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)
    return inner


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, Mapping[str, Any]]:
    """``{id(parameter): its param_group}`` of ``optimizer``."""
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _deepspeed_adams() -> tuple[type, ...]:
    """DeepSpeed's Adam classes (``FusedAdam``; ``DeepSpeedCPUAdam``, ZeRO-Offload's), or none
    when DeepSpeed is not imported (then no optimizer is DeepSpeed's; importing it is slow)."""
    if "deepspeed" not in sys.modules:
        return ()
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    except ImportError:
        return ()
    return (FusedAdam, DeepSpeedCPUAdam)


def is_adam_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` (a torch optimizer itself, not a wrapper) takes Adam's step:
    torch's ``Adam`` / ``AdamW`` (the fused and foreach variants too), or DeepSpeed's
    ``FusedAdam`` or ``DeepSpeedCPUAdam``, which a DeepSpeed engine builds from a config's
    ``optimizer`` section or, under ZeRO-Offload, in place of the trainer's optimizer.  Their
    state (``exp_avg``, ``exp_avg_sq``, ``step``) and step are torch's; the differences are in
    the hyperparameters (:func:`adam_hyperparameters`).  Their subclasses are not counted
    (ZenFlow's CPU Adam updates a selection of coordinates at a time), nor is a ``FusedAdam``
    with a param group of several tensors: it counts a group's steps in the state of the last
    tensor it steps and gives every tensor of the group that count (deepspeed 0.19), so the
    other tensors' counts are not their steps'.  Under ZeRO each group is one flat partition."""
    if not is_adam_type(type(optimizer)):
        return False
    if type(optimizer).__name__ == "FusedAdam":
        return all(len(group["params"]) <= 1 for group in optimizer.param_groups)
    return True


def is_adam_type(cls: type) -> bool:
    """Whether optimizers of class ``cls`` take Adam's step (:func:`is_adam_optimizer`)."""
    return issubclass(cls, torch.optim.Adam) or cls in _deepspeed_adams()


def adam_hyperparameters(
    optimizer: torch.optim.Optimizer, group: Mapping[str, Any]
) -> Mapping[str, Any]:
    """``group`` of an Adam ``optimizer`` (:func:`is_adam_optimizer`) with torch's names for
    what this module reads: ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``decoupled_weight_decay`` (AdamW's decay), ``amsgrad`` and ``bias_correction`` (True:
    torch's Adam always divides by ``1 - beta^t``).  DeepSpeed's Adams keep the AdamW switch on
    the optimizer (``adam_w_mode``; a group that accelerate copied from torch's optimizer may
    still say otherwise), may turn bias correction off per group, and have no amsgrad."""
    if isinstance(optimizer, torch.optim.Adam):
        return group
    return {
        **group,
        "decoupled_weight_decay": bool(getattr(optimizer, "adam_w_mode")),  # noqa: B009
        "amsgrad": False,
        "bias_correction": bool(group.get("bias_correction", True)),
    }


def _bias_correction(group: Mapping[str, Any], beta: float, step: float) -> float:
    """``1 - beta^t``, Adam's bias correction at step ``t``; 1 where the group turns it off."""
    return 1.0 - beta**step if group.get("bias_correction", True) else 1.0


class AdamStates:
    """Each parameter's Adam hyperparameters (``group``), state (``state``: ``exp_avg``,
    ``exp_avg_sq``, ``step``, laid out as the parameter) and the gradient the step will use
    (``gradient``), as torch's own optimizer holds them: keyed by the parameter, the
    gradient in ``.grad`` (clipped by ``Trainer`` before the step).  Under DeepSpeed ZeRO 1/2
    the same are gathered from flat partitions (``clients.zero.ZeroAdamStates``)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        #: the torch optimizer (Adam-family in adam geometry, :func:`is_adam_optimizer`)
        self.optimizer = optimizer
        self._groups = _group_of(optimizer)

    def group(self, parameter: torch.Tensor) -> Mapping[str, Any] | None:
        """The parameter's hyperparameters (:func:`adam_hyperparameters`), None when the
        optimizer does not step it."""
        group = self._groups.get(id(parameter))
        return None if group is None else self.hyperparameters(group)

    def hyperparameters(self, group: Mapping[str, Any]) -> Mapping[str, Any]:
        if not is_adam_optimizer(self.optimizer):
            return group
        return adam_hyperparameters(self.optimizer, group)

    def state(self, parameter: torch.Tensor) -> Mapping[str, Any]:
        return self.optimizer.state.get(parameter, {})

    def gradient(self, parameter: torch.Tensor) -> torch.Tensor | None:
        return parameter.grad

    def value(self, parameter: torch.Tensor) -> torch.Tensor:
        """The parameter's value as the optimizer steps it (laid out as the parameter)."""
        return parameter.detach()


def adam_states(optimizer: Any) -> AdamStates:
    """Where ``optimizer`` (torch's, accelerate's wrapper of it, or DeepSpeed ZeRO's) keeps
    what the Adam geometry reads."""
    from clients.zero import Zero3AdamStates, ZeroAdamStates, is_stage3, zero_optimizer

    zero = zero_optimizer(optimizer)
    if zero is not None:
        return Zero3AdamStates(zero) if is_stage3(zero) else ZeroAdamStates(zero)
    return AdamStates(_unwrapped(optimizer))


def adam_preconditioner(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    parameter_filter: ParameterFilter | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: sqrt(P)}`` from an ``Adam`` / ``AdamW`` state, ``P = 1/(sqrt(v_hat) + eps)``.

    Each value has the parameter's shape, float32, on its device.  Only the parameters chosen
    by ``parameter_filter`` (default: all trainable) are returned; every one of them must be in
    the optimizer with a state (i.e. after at least one ``optimizer.step()``).
    """
    return dict(adam_taken_preconditioner(optimizer, select_parameters(model, parameter_filter)))


def adam_taken_preconditioner(
    optimizer: torch.optim.Optimizer,
    parameters: Mapping[str, torch.Tensor],
    *,
    lazy: bool = False,
) -> Mapping[str, torch.Tensor]:
    """``{name: sqrt(P_t)}`` of the step just taken, from the state after it (``v_t``, its
    running maximum with amsgrad, and ``t``): what that step divided by.  ``lazy``: each value
    is computed when read (no ``N``-float copy held)."""
    states = adam_states(optimizer)

    def one(name: str, flat: slice | None = None) -> torch.Tensor:
        p = parameters[name]
        group = states.group(p)
        if group is None:
            raise ValueError(f"parameter {name!r} is not handled by this optimizer")
        if "betas" not in group or "eps" not in group:
            raise TypeError("adam_preconditioner needs an Adam-family optimizer (betas, eps)")
        state = states.state(p)
        if "exp_avg_sq" not in state or "step" not in state:
            raise ValueError(
                f"parameter {name!r} has no Adam state yet: take one optimizer step first "
                "(or use the sgd geometry for the first step)"
            )
        beta2 = float(group["betas"][1])
        eps = float(group["eps"])
        step = _step_count(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        v = _part(local(v), flat).detach().float()
        precond = 1.0 / ((v / _bias_correction(group, beta2, step)).sqrt() + eps)
        return _laid_out(precond.sqrt().masked_fill_(v == 0, 0.0), p, flat)

    return _per_parameter(parameters, one, lazy)


def _part(t: torch.Tensor, flat: slice | None) -> torch.Tensor:
    """``t`` itself, or the flat range ``flat`` of its entries (a view: ``t`` is contiguous)."""
    return t if flat is None else t.reshape(-1)[flat]


def _laid_out(value: torch.Tensor, parameter: torch.Tensor, flat: slice | None) -> torch.Tensor:
    """``value``, computed from this rank's part of ``parameter``'s tensors, laid out as the
    parameter: sharded like it under FSDP2 (:mod:`clients.shards`), where a flat range of the
    whole is not this rank's to compute."""
    if flat is not None and is_sharded(parameter):
        raise UnsupportedShardingError(
            "a flat range of a sharded parameter's value: gather the whole value first"
        )
    return like(value, parameter)


def _per_parameter(
    parameters: Mapping[str, torch.Tensor],
    one: Callable[[str, slice | None], torch.Tensor],
    lazy: bool,
) -> Mapping[str, torch.Tensor]:
    if lazy:
        return OnAccess(tuple(parameters), one)
    return {name: one(name, None) for name in parameters}


class OnAccess(Mapping[str, torch.Tensor]):
    """A read-only ``{name: tensor}`` whose values are computed each time they are read: a
    per-parameter quantity of a large model (``sqrt(P)``) without holding all of it at once.

    ``compute(name, None)`` gives the value in the parameter's shape, ``compute(name, flat)``
    the flat range ``flat`` of it alone (:meth:`flat_range`)."""

    def __init__(
        self, names: tuple[str, ...], compute: Callable[[str, slice | None], torch.Tensor]
    ) -> None:
        self._names = names
        self._known = frozenset(names)
        self._compute = compute

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._compute(name, None)

    def flat_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Flat entries ``start .. stop - 1`` of ``self[name]``, computed from that range of
        the inputs only: a capture that scales a block of a large weight's rows at a time
        reads that block of the gradient and optimizer state, and no parameter-sized
        temporary is made."""
        if name not in self._known:
            raise KeyError(name)
        return self._compute(name, slice(start, stop))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def is_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` (or the optimizer an accelerate or DeepSpeed wrapper holds)
    takes Adam's step (:func:`is_adam_optimizer`)."""
    return is_adam_optimizer(adam_states(optimizer).optimizer)


def adam_step_preconditioner(
    optimizer: torch.optim.Optimizer,
    parameters: Mapping[str, torch.Tensor],
    *,
    lazy: bool = False,
) -> Mapping[str, torch.Tensor]:
    """``{name: sqrt(P_t)}`` of the ``Adam`` / ``AdamW`` step about to be taken.

    Call it after the step's gradient is complete (accumulated, all-reduced, clipped) and before
    ``optimizer.step()``: it computes what that step will divide by, from each parameter's
    ``.grad`` ``g`` and state (``v``, ``step``; empty before the first step), as torch does:
    ``v_t = beta2 v + (1 - beta2) g^2`` (``g + lambda theta`` with ``Adam``'s coupled weight
    decay), ``v_hat = v_t / (1 - beta2^t)`` (``max(v_max, v_t)`` with amsgrad),
    ``P_t = 1 / (sqrt(v_hat) + eps)``.  With ``beta1 = 0`` and no weight decay the step is
    exactly ``-lr P_t g``, so the ``adam``-geometry kernel ``w_i^T P_t w_j`` gives the step's
    first-order prediction.  A parameter without a gradient gets ``P_t`` from ``g = 0``.
    ``lazy``: each value is computed when read (no ``N``-float copy held; read them before the
    step).
    """
    states = adam_states(optimizer)
    _check_adam(states.optimizer)

    def one(name: str, flat: slice | None = None) -> torch.Tensor:
        p = parameters[name]
        group = states.group(p)
        if group is None:
            raise ValueError(f"parameter {name!r} is not handled by this optimizer")
        beta2, eps = float(group["betas"][1]), float(group["eps"])
        grad = states.gradient(p)
        if grad is None:
            g = torch.zeros_like(_part(local(states.value(p)), flat), dtype=torch.float32)
        else:
            g = _part(local(grad), flat).float()
        decay = float(group.get("weight_decay", 0.0))
        if decay and not group.get("decoupled_weight_decay", False):
            g = g + decay * _part(local(states.value(p)), flat).float()
        state = states.state(p)
        step = _step_count(state.get("step", 0.0)) + 1.0
        # In place on one buffer: the same IEEE operations in the same order as the plain
        # expressions (bit-equal), at a third of their time on a large parameter, which a
        # lazy preconditioner recomputes for every capture.
        v = g.mul(g).mul_(1.0 - beta2)
        if "exp_avg_sq" in state:
            v.add_(_part(local(state["exp_avg_sq"]), flat).detach().float().mul(beta2))
        if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
            peak = _part(local(state["max_exp_avg_sq"]), flat).detach().float()
            torch.maximum(v, peak, out=v)
        never = v == 0  # no second moment: P = 0 (the module's docstring)
        v.div_(_bias_correction(group, beta2, step)).sqrt_().add_(eps)
        sqrt_p = torch.reciprocal(v, out=v).sqrt_().masked_fill_(never, 0.0)
        return _laid_out(sqrt_p, p, flat)

    return _per_parameter(parameters, one, lazy)


def _check_adam(optimizer: torch.optim.Optimizer) -> None:
    if not is_adam_optimizer(optimizer):
        raise TypeError(
            "adam geometry needs an Adam optimizer (torch's Adam or AdamW, DeepSpeed's "
            f"FusedAdam or DeepSpeedCPUAdam), got {type(optimizer).__name__}"
        )


def adam_gradient_share(
    optimizer: torch.optim.Optimizer, parameters: Mapping[str, torch.Tensor]
) -> float:
    """``(1 - beta1) / (1 - beta1^t)``: the share of the step's own gradient in Adam's update
    ``-lr P_t m_hat_t``, ``m_hat_t = (beta1 m_{t-1} + (1 - beta1) g_t) / (1 - beta1^t)``, read
    after ``optimizer.step()`` (``t`` its step count; 1 at the first step, where the update is
    ``-lr P_1 g_1``).  The rest of the update is the momentum carried from earlier steps."""
    states = adam_states(optimizer)
    for p in parameters.values():
        state, group = states.state(p), states.group(p)
        if "step" in state and group is not None:
            beta1 = float(group["betas"][0])
            return (1.0 - beta1) / _bias_correction(group, beta1, _step_count(state["step"]))
    raise ValueError("no parameter has an Adam state: call it after optimizer.step()")


def adam_step_counts(
    optimizer: torch.optim.Optimizer, parameters: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """``{name: step count}`` of each parameter's ``Adam`` / ``AdamW`` state (0 before its first
    step); take it just before ``optimizer.step()`` for :func:`adam_applied_update`."""
    states = adam_states(optimizer)
    return {n: _step_count(states.state(p).get("step", 0.0)) for n, p in parameters.items()}


def adam_applied_update(
    optimizer: torch.optim.Optimizer,
    parameters: Mapping[str, torch.Tensor],
    steps_before: Mapping[str, float],
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, theta_after - theta_before)`` of each parameter, float32, one at a time, read
    from the state of the ``Adam`` / ``AdamW`` step just taken instead of a snapshot.

    Call it after ``optimizer.step()``.  The step was ``theta' = theta (1 - lr lambda) -
    (lr / (1 - beta1^t)) m_t / (sqrt(v_t / (1 - beta2^t)) + eps)`` (decoupled decay
    ``lambda``, AdamW; ``Adam``'s coupled decay is inside ``m_t``; ``v_t`` the running maximum
    with amsgrad; a maximised objective's sign is inside ``m_t`` too), so its update follows
    from ``m_t``, ``v_t``, ``t`` and ``theta'``, as torch computed it up to the rounding of
    ``theta'`` (zero-mean, at most half a unit in the last place of each coordinate).  A
    parameter the step skipped (no gradient: its count equals ``steps_before``) gets zeros.
    ``theta'`` is the value the optimizer steps (:meth:`AdamStates.value`: under DeepSpeed its
    fp32 master value, gathered only when there is decoupled decay to undo).  Memory: a few
    temporaries of one parameter's size, where a snapshot costs a copy of all.
    """
    states = adam_states(optimizer)
    _check_adam(states.optimizer)
    for name, p in parameters.items():
        group, state = states.group(p), states.state(p)
        if group is None:
            raise ValueError(f"parameter {name!r} is not handled by this optimizer")
        update = adam_state_update(  # calls value and read before the loop moves on
            group,
            state,
            steps_before[name],
            value=lambda: local(states.value(p)),  # noqa: B023
            read=lambda key: local(state[key]),  # noqa: B023
        )
        if update is None:
            update = torch.zeros_like(local(p), dtype=torch.float32)
        yield name, like(update, p)


def adam_state_update(
    group: Mapping[str, Any],
    state: Mapping[str, Any],
    steps_before: float,
    value: Callable[[], torch.Tensor],
    read: Callable[[str], torch.Tensor],
) -> torch.Tensor | None:
    """``theta_after - theta_before`` (float32) of a parameter, or of any part of it, from the
    state of the Adam step just taken (:func:`adam_update`); None where the step skipped it
    (no gradient: its count ``state["step"]`` is still ``steps_before``).  ``read(key)`` gives
    the part of the state tensor ``key`` (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``),
    ``value()`` the part of the value after the step, read only to undo decoupled weight
    decay."""
    step = _step_count(state.get("step", 0.0))
    if step == steps_before:
        return None
    v = read("max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq")
    decoupled = group.get("decoupled_weight_decay", False) and group.get("weight_decay", 0.0)
    return adam_update(group, step, value() if decoupled else None, read("exp_avg"), v)


def adam_update(
    group: Mapping[str, Any],
    step: float,
    theta_after: torch.Tensor | None,
    exp_avg: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """``theta_after - theta_before`` (float32) of one ``Adam`` / ``AdamW`` step of a parameter
    in ``group``, from its state after the step (``exp_avg``, ``v`` its ``exp_avg_sq`` or
    running maximum, the step count ``step``): every operation is elementwise, so the tensors
    may be any part of the parameter (a shard, a flat partition) laid out alike
    (:func:`adam_applied_update`).  ``theta_after`` is needed only with decoupled weight
    decay."""
    lr, eps = float(group["lr"]), float(group["eps"])
    beta1, beta2 = (float(b) for b in group["betas"])
    denom = v.detach() / _bias_correction(group, beta2, step)
    denom = denom.sqrt_().add_(eps)
    update = exp_avg.detach() / denom
    update.mul_(-lr / _bias_correction(group, beta1, step))
    decay = float(group.get("weight_decay", 0.0))
    if decay and group.get("decoupled_weight_decay", False):
        if theta_after is None:
            raise ValueError("decoupled weight decay: the value after the step is needed")
        # theta' = theta (1 - lr decay) + update, so theta = (theta' - update) / (1 - lr decay)
        before = (theta_after.detach() - update).div_(1.0 - lr * decay)
        update.sub_(before.mul_(lr * decay))
    return update.float()


def scale_rows(
    gradients: Mapping[str, torch.Tensor], sqrt_p: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{name: rows * sqrt(P)}``: rows ``[n, *shape]`` (or ``[n, numel]``) times ``sqrt(P)``.

    The kernel of the result is ``w_i^T P w_j``.  Every gradient name needs a ``sqrt_p`` entry.
    """
    out: dict[str, torch.Tensor] = {}
    for name, rows in gradients.items():
        if name not in sqrt_p:
            raise KeyError(f"no preconditioner for parameter {name!r}")
        scale = sqrt_p[name].to(device=rows.device, dtype=torch.float32).reshape(1, -1)
        out[name] = (rows.reshape(rows.shape[0], -1).float() * scale).reshape(rows.shape)
    return out


def unscaled(u: torch.Tensor, sqrt_p: torch.Tensor) -> torch.Tensor:
    """``u / sqrt(P)`` (float32, ``u``'s shape), 0 where ``sqrt(P) = 0``: the applied update's
    row in ``adam`` geometry, whose inner product with a row ``sqrt(P) w`` is ``<w, u>`` over
    the coordinates Adam has a second moment for (elsewhere ``u`` is weight decay alone)."""
    scale = sqrt_p.to(device=u.device, dtype=torch.float32)
    return torch.nan_to_num(u.float() / scale, nan=0.0, posinf=0.0, neginf=0.0)


def unscale_update(
    update: Mapping[str, torch.Tensor], sqrt_p: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{name: u / sqrt(P)}``, the applied update's row in ``adam`` geometry (shapes kept;
    :func:`unscaled`)."""
    return {name: unscaled(u, sqrt_p[name]) for name, u in update.items()}


@dataclass
class AppliedUpdateCapture:
    """Context manager around ``optimizer.step()`` recording ``u = theta_after - theta_before``.

    >>> with AppliedUpdateCapture(model) as applied:
    ...     optimizer.step()
    >>> applied.update   # {name: tensor of the parameter's shape}, float32

    ``parameter_filter`` picks the parameters (the run's declared ones).  The snapshot costs one
    copy of those parameters.
    """

    model: nn.Module
    parameter_filter: ParameterFilter | None = None
    update: dict[str, torch.Tensor] = field(default_factory=dict)
    _before: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __enter__(self) -> AppliedUpdateCapture:
        params = select_parameters(self.model, self.parameter_filter)
        self._before = {k: p.detach().clone() for k, p in params.items()}
        self.update = {}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._before = {}
            return
        params = dict(self.model.named_parameters())
        self.update = {
            # subtract in the parameters' own dtype (exact for float64 too), then cast
            k: (params[k].detach() - before).float()
            for k, before in self._before.items()
        }
        self._before = {}

    def values(self, sqrt_p: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The update to push with ``Client.push_applied_update`` (parameter shapes).

        With ``sqrt_p`` (adam geometry) it is ``u / sqrt(P)``; without, ``u`` (sgd geometry).
        """
        if not self.update:
            raise RuntimeError("no update captured: use the object as a context manager first")
        return dict(self.update) if sqrt_p is None else unscale_update(self.update, sqrt_p)


def logprob_after(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """``[n]`` float32 ``S'_i``: the same sequences' response log-probs after the step."""
    return sequence_logprobs(model, batch)
