"""What a DeepSpeed engine steps with, read from its config before it exists."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from clients.zero import engine_optimizer

OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}


@pytest.mark.parametrize(
    ("config", "trainer_optimizer", "expected"),
    [
        ({"zero_optimization": {"stage": 2}}, torch.optim.SGD, None),  # the trainer's own
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}},
            torch.optim.SGD,
            None,
        ),
        ({"optimizer": {"type": "AdamW", "params": {}}}, torch.optim.SGD, "adam"),
        ({"optimizer": {"type": "adam"}, **OFFLOAD}, torch.optim.SGD, "adam"),
        ({"optimizer": {"type": "Lamb"}}, torch.optim.AdamW, "other"),
        ({"optimizer": {"type": "OneBitAdam"}}, torch.optim.AdamW, "other"),
        # ZeRO-Offload without a section: accelerate puts DeepSpeed's CPU Adam in place of any
        # optimizer but Adagrad and Lion, unless told not to
        (OFFLOAD, torch.optim.AdamW, "adam"),
        (OFFLOAD, torch.optim.SGD, "adam"),
        (OFFLOAD, torch.optim.Adagrad, "other"),
        ({**OFFLOAD, "zero_force_ds_cpu_optimizer": False}, torch.optim.SGD, None),
    ],
)
def test_engine_optimizer_follows_deepspeed_and_accelerate(
    config: dict[str, Any], trainer_optimizer: type, expected: str | None
) -> None:
    assert engine_optimizer(config, trainer_optimizer) == expected
