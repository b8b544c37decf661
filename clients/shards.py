"""Parameters sharded by FSDP2 (torch's ``fully_shard``): their local part, its place in the
whole parameter, and the two ways a whole-parameter quantity is made from the parts.

Under FSDP2 every parameter is a ``DTensor`` sharded on dim 0 over a 1-D device mesh
(``placements == (Shard(0),)``): rank ``r`` holds a block of rows, which is one contiguous
range of the row-major flattened parameter.  Its gradient and the optimizer's state
(``exp_avg``, ``exp_avg_sq``) are sharded the same way, so elementwise quantities of the step
(Adam's ``sqrt(P)``, the applied update) are computed on the local part alone, and then

* the sketch of the whole is the sum over ranks of the sketches of the local flat ranges
  (partial sketches add up, math.md §7): one all-reduce of ``k`` floats
  (:func:`sketch_of_whole`), where gathering the update would move the whole model;
* where a rank needs the whole (``sqrt(P)`` scales the rank's own sequences' rows, which
  cover whole weights) it is gathered, one parameter at a time, when the capture reads it
  (:class:`GatheredOnAccess`).

A forward without a backward after the optimizer step (``logprob_after``) must reshard the
model after it (:func:`resharded`).

Parameters that are plain tensors are whole on every rank.  Other ``DTensor`` layouts (tensor
parallelism's ``Shard(1)``, HSDP's 2-D mesh) are refused with :class:`UnsupportedShardingError`.

DeepSpeed ZeRO 3 partitions plain tensors instead: rank ``r`` holds one flat range of each
(:func:`is_partitioned`, :func:`full_shape`; the ranges come from ``clients.zero``), and
:func:`sketch_of_whole` adds the ranks' sketches of their :class:`FlatRange` alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from sketch.base import Sketcher


class UnsupportedShardingError(ValueError):
    """A parameter is a ``DTensor`` laid out other than FSDP2's ``Shard(0)`` on a 1-D mesh."""


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter, gradient or state of an FSDP2 model)."""
    return isinstance(t, DTensor)


def _checked(t: DTensor) -> DTensor:
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise UnsupportedShardingError(
            f"a parameter laid out as {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh: "
            "kernelscope supports FSDP2's Shard(0) on a 1-D mesh"
        )
    return t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when it is not sharded), same dtype, no copy."""
    return _checked(t).to_local() if isinstance(t, DTensor) else t


def like(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``value``, this rank's part of a quantity laid out as ``parameter``, as a ``DTensor``
    sharded like it (``value`` itself when ``parameter`` is not sharded)."""
    if not isinstance(parameter, DTensor):
        return value
    _checked(parameter)
    return DTensor.from_local(
        value,
        parameter.device_mesh,
        parameter.placements,
        run_check=False,
        shape=parameter.shape,
        stride=parameter.stride(),
    )


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t``, gathered from every rank when it is sharded (a collective: every
    rank calls it, in the same order)."""
    return _checked(t).full_tensor() if isinstance(t, DTensor) else t


class GatheredOnAccess(Mapping[str, torch.Tensor]):
    """``{name: whole value}`` of a per-parameter quantity held as shards (``sharded``, values
    laid out as the parameters, e.g. a lazy ``sqrt(P)``), each value computed and gathered
    when it is read: one parameter's whole value at a time is held, where gathering them all
    would hold 4 bytes per parameter on every rank.

    Reading a name other than the last one read gathers it, a collective: every rank must read
    the same names in the same order.  A hook capture does, as FSDP's own gathers do: its
    hooks read each parameter's value in the backward's module order, which the model fixes,
    and then the vectors' in name order, and a name read again in a row is not gathered
    again."""

    def __init__(self, sharded: Mapping[str, torch.Tensor]) -> None:
        self._sharded = sharded
        self._name: str | None = None
        self._value: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name != self._name or self._value is None:
            self._value = None  # free the last one before gathering the next
            self._value = whole(self._sharded[name])
            self._name = name
        return self._value

    def release(self) -> None:
        """Free the value held (the next read gathers again)."""
        self._name, self._value = None, None

    def __iter__(self) -> Iterator[str]:
        return iter(self._sharded)

    def __len__(self) -> int:
        return len(self._sharded)


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` is managed by ZeRO stage 3 (``deepspeed.zero.Init`` or the
    engine's partitioning): its ``data`` is then empty or this rank's flat partition outside
    the forward and backward of its module, which DeepSpeed's module hooks gather around."""
    return hasattr(parameter, "ds_id")


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """``parameter``'s whole shape, also when ZeRO 3 holds only a partition of it."""
    shape: torch.Size | None = getattr(parameter, "ds_shape", None)
    return parameter.shape if shape is None else shape


def whole_value(parameter: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """A detached copy of ``parameter``'s whole value (``copy=False``: the detached value
    itself, to read at once).  A ZeRO 3 parameter must be gathered (inside its module's
    forward, where DeepSpeed's pre-forward hook has fetched it)."""
    if is_partitioned(parameter):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if parameter.ds_status != ZeroParamStatus.AVAILABLE:  # type: ignore[attr-defined]
            raise RuntimeError(
                "a ZeRO 3 parameter read outside its module's forward: it is not gathered"
            )
    return parameter.detach().clone() if copy else parameter.detach()


def flat_offset(t: torch.Tensor) -> int:
    """Where this rank's part of ``t`` starts in the flattened whole (0 when not sharded).

    ``Shard(0)`` splits dim 0 as ``torch.chunk`` does: ``ceil(d0 / W)`` rows per rank, the last
    ranks holding fewer or none."""
    if not isinstance(t, DTensor):
        return 0
    _checked(t)
    rows = t.shape[0]
    per_rank = -(-rows // t.device_mesh.size())
    first_row = min(rows, per_rank * t.device_mesh.get_local_rank())
    return first_row * (t.numel() // rows if rows else 0)


@dataclass(frozen=True)
class FlatRange:
    """This rank's part of a whole value that the ranks of ``group`` hold in disjoint flat
    ranges which add up to the whole (DeepSpeed ZeRO 3's partitions): entries ``[offset,
    offset + len(values))`` of the row-major flattened value."""

    values: torch.Tensor  # [m], any float dtype
    offset: int
    group: Any  # the ranks' process group


def sketch_of_whole(
    sketcher: Sketcher, parts: Iterable[tuple[str, torch.Tensor | FlatRange]]
) -> torch.Tensor:
    """``[k]`` float32: the sketch of one row given parameter by parameter, ``parts`` ``(name,
    value laid out as the parameter, or this rank's FlatRange of it)``, made by every rank at
    once.

    Each rank sketches the flat range it holds of every sharded value (``name@offset``), and
    the group's first rank the whole of every plain value (those are whole on every rank); one
    all-reduce over the group adds the partial sketches up, so every rank gets the sketch of
    the whole row.  Without sharded values nothing is exchanged.  Every rank calls it with the
    same names in the same order.
    """
    sharded = torch.zeros(sketcher.dim)
    plain = torch.zeros(sketcher.dim)
    group, device, first = None, None, True
    for name, value in parts:
        if isinstance(value, DTensor):
            mesh = _checked(value).device_mesh
            group, device = mesh.get_group(), torch.device(mesh.device_type)
            first = mesh.get_local_rank() == 0
            flat, offset = value.to_local().reshape(1, -1).float(), flat_offset(value)
        elif isinstance(value, FlatRange):
            group, device = value.group, value.values.device
            first = dist.get_rank(group=group) == 0
            flat, offset = value.values.reshape(1, -1).float(), value.offset
        else:
            plain += sketcher.sketch({name: value.reshape(1, -1).float()})[0].cpu()
            continue
        if flat.numel():
            sharded += sketcher.sketch_slice(name, flat, offset)[0].cpu()
    if group is None:
        return plain
    if not first:
        plain.zero_()
    total = (sharded + plain).to(device)
    dist.all_reduce(total, group=group)
    return total.cpu()


@contextlib.contextmanager
def resharded(model: nn.Module) -> Iterator[None]:
    """Reshard ``model``'s FSDP2 modules after the block (nothing without them).

    FSDP2 frees a module's gathered parameters after its forward or, for the root module,
    after the backward; after a forward without a backward (under ``no_grad``) the root keeps
    the gathered copies registered as its parameters.  Then ``model.parameters()`` yields
    those copies, so ``Trainer``'s ``model.zero_grad()`` leaves the shards' gradients in place
    and the next step's backward adds to them."""
    try:
        yield
    finally:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


@contextlib.contextmanager
def leaf_reductions_suspended(model: nn.Module) -> Iterator[None]:
    """Keep DeepSpeed ZeRO 3's gradient reduction of its leaf modules out of the block.

    ZeRO 3 gathers a MoE block (a "leaf module": transformers and accelerate mark the sparse
    MoE blocks with ``set_z3_leaf_modules``) whole, and reduces its parameters' gradients from
    a full backward hook on it (``reduce_leaf_module_grads``), which fires on any backward
    through the block: a capture's too, where it would set every such parameter's ``.grad``
    to zeros and reduce them into the step's gradient partitions out of turn.  The block's
    forward and backward here run without its backward hooks, which only reduce."""
    leaves = [m for m in model.modules() if getattr(m, "_z3_leaf", False) and m._backward_hooks]
    saved = [(m, m._backward_hooks) for m in leaves]
    for module in leaves:
        module._backward_hooks = type(module._backward_hooks)()
    try:
        yield
    finally:
        for module, hooks in saved:
            module._backward_hooks = hooks
