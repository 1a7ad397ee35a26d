"""Case 16 A on a real GPU: RNG state saved on CUDA, loaded with a GPU map_location."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gpufleet.job import Checkpointer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_restore_with_cuda_map_location_restores_cpu_and_cuda_rng(
    tmp_path: Path,
) -> None:
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(device)
    model = nn.Linear(4, 4).to(device)
    torch.rand(1, device=device)  # initializes the CUDA generator
    ckpt = Checkpointer(
        model, url=str(tmp_path), install_signal=False, async_save=False
    )
    ckpt.step(1)
    ckpt.save()
    expected = (
        random.random(),
        float(np.random.rand()),
        torch.rand(3).tolist(),
        torch.rand(3, device=device).tolist(),
    )
    torch.cuda.set_device(0)
    fresh = Checkpointer(
        nn.Linear(4, 4).to("cuda:0"),
        url=str(tmp_path),
        install_signal=False,
        map_location="cuda:0",
    )
    assert fresh.restore() == 1
    assert fresh.last_restore is not None
    assert fresh.last_restore.exact
    got = (
        random.random(),
        float(np.random.rand()),
        torch.rand(3).tolist(),
        torch.rand(3, device="cuda:0").tolist(),
    )
    assert got == expected
