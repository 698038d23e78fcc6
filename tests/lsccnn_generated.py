"""Generated LSC-CNN weights: seeded random values of the official shapes.

Used wherever the official checkpoint is absent (tests, the fleet tests' GPU-role workers, the
GPU benchmark). Needs only torch and the anonymiser, so the benchmark runs on a machine that has
nothing of the bot installed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from anonymiser.locators import lsccnn_checkpoint as ckpt
from anonymiser.locators.lsccnn_net import LSCCNN


def he_init(net: nn.Module) -> nn.Module:
    """Random weights that keep activations alive through 20+ layers, so logits vary in space."""
    with torch.no_grad():
        for name, module in net.named_modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.normal_(module.bias, std=0.1)
                if name.endswith("_5"):  # logit layers: keep the softmax away from saturation
                    module.weight.mul_(0.03)
    return net


def generated_lsccnn_checkpoint(folder: Path, seed: int = 0) -> str:
    """Write a generated checkpoint under the official file name in ``folder``; returns its MD5,
    which the loader accepts through ``ANON_LSCCNN_MD5`` (or ``expected_md5``)."""
    torch.manual_seed(seed)
    path = Path(folder) / ckpt.OFFICIAL_FILENAME
    ckpt.write_bare_state_dict(he_init(LSCCNN()), path)
    return hashlib.md5(path.read_bytes()).hexdigest()
