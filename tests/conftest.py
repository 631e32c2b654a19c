from __future__ import annotations

import pytest
import torch

from pipeline.config import PriorConfig


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


def tiny_config(output: str, **train) -> PriorConfig:
    """A prior small enough to train for a few steps in a test (16x16 digits, ~20k parameters)."""
    return PriorConfig.model_validate({
        "name": "tiny",
        "data": {"source": "digits", "split": "train", "size": 16, "channels": 1},
        "unet": {"image_size": 16, "channels": 1, "base_channels": 8, "channel_mults": [1, 2],
                 "num_res_blocks": 1, "attention_resolutions": [8]},
        "train": {"steps": 10, "batch_size": 16, "lr": 2e-3, "warmup_steps": 2,
                  "checkpoint_every": 3, "seed": 0, **train},
        "output": output,
    })
