"""Which parameters a capture studies.

A run declares its parameters once (``POST /v1/runs`` ``parameters: {name: shape}``); every
gradient row of the run then covers that subset.  :class:`ParameterFilter` picks the subset
from a model's ``named_parameters()`` (tied weights appear once, under their first name, as
PyTorch reports them) and gives the declared dict for ``create_run``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from clients.shards import full_shape

#: Substring that PEFT puts in the names of LoRA adapter parameters
#: (``...q_proj.lora_A.default.weight``, ``...lora_B...``, ``lora_embedding_A`` ...).
LORA_MARKER = "lora_"


def _as_patterns(values: str | Iterable[str] | None) -> tuple[re.Pattern[str], ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(re.compile(v) for v in values)


@dataclass(frozen=True)
class ParameterFilter:
    """Select parameters by name.

    A parameter is kept when all of these hold:

    * ``requires_grad`` is true, unless ``trainable_only=False``;
    * ``include`` is empty, or its name is in ``include`` or matches one of ``include_regex``
      (``re.search``);
    * its name is not in ``exclude`` and matches none of ``exclude_regex``;
    * with ``lora_only``, its name contains ``"lora_"`` (PEFT adapters);
    * with ``max_ndim``, ``param.ndim <= max_ndim``; with ``min_ndim``, ``param.ndim >= min_ndim``
      (``min_ndim=2`` keeps matrices only: no norms, no biases).

    Parameters
    ----------
    include, exclude:
        exact parameter names.
    include_regex, exclude_regex:
        regular expressions (a string or several), matched with ``re.search``.
    """

    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    include_regex: str | Sequence[str] | None = None
    exclude_regex: str | Sequence[str] | None = None
    lora_only: bool = False
    trainable_only: bool = True
    min_ndim: int = 0
    max_ndim: int | None = None
    _include_patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _exclude_patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include_patterns", _as_patterns(self.include_regex))
        object.__setattr__(self, "_exclude_patterns", _as_patterns(self.exclude_regex))

    def accepts(self, name: str, param: torch.Tensor) -> bool:
        """Whether the parameter ``name`` (a tensor of any shape) is selected."""
        if self.trainable_only and not param.requires_grad:
            return False
        if self.include or self._include_patterns:
            listed = name in self.include
            matched = any(p.search(name) for p in self._include_patterns)
            if not (listed or matched):
                return False
        if name in self.exclude or any(p.search(name) for p in self._exclude_patterns):
            return False
        if self.lora_only and LORA_MARKER not in name:
            return False
        ndim = len(full_shape(param))  # a ZeRO 3 partition is flat
        if ndim < self.min_ndim:
            return False
        return not (self.max_ndim is not None and ndim > self.max_ndim)

    def named_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The selected ``{name: parameter}`` of ``model``, in ``named_parameters()`` order."""
        return {n: p for n, p in model.named_parameters() if self.accepts(n, p)}

    def declared_parameters(self, model: nn.Module) -> dict[str, list[int]]:
        """``{name: shape}`` of the selected parameters: the ``parameters`` of ``create_run``."""
        return {n: list(full_shape(p)) for n, p in self.named_parameters(model).items()}


def select_parameters(
    model: nn.Module, parameter_filter: ParameterFilter | None = None
) -> dict[str, nn.Parameter]:
    """Parameters chosen by ``parameter_filter`` (default: every trainable parameter)."""
    chosen = (parameter_filter or ParameterFilter()).named_parameters(model)
    if not chosen:
        raise ValueError("the parameter filter selects no parameter of this model")
    return chosen
