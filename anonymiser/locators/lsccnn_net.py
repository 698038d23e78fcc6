"""The LSC-CNN network (``scale_4`` variant), checkpoint-compatible with ``scale_4_epoch_46.pth``.

Clean-room implementation of /work/shared/lsccnn-spec.md §1-§2.1. Module names are interface
facts: they are the state_dict keys of the official checkpoint, so they must not be renamed and
the modules must be registered in the spec's order (§1.2, 58 modules, 116 tensors).

Input: ``N x 3 x H x W`` float, **RGB, raw 0-255**, H and W multiples of 16. The network subtracts
the Caffe means (104.008, 116.669, 122.675) from channels 0/1/2 itself. Those are BGR means applied
to RGB data; the trained weights expect exactly that mismatch, so it is reproduced, not fixed.

Output: logits ``(O0, O1, O2, O3)`` at 1/16, 1/8, 1/4, 1/2 of the input, 4 channels each
(3 box classes, then background).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Subtracted from input channels 0, 1, 2 (spec §2.1). Kept as a Python constant rather than a
#: tensor attribute so that it is never in the state_dict, always lands on the input's device and
#: is not rounded to 104.0 when someone calls ``model.half()``.
CHANNEL_MEANS: tuple[float, float, float] = (104.008, 116.669, 122.675)

#: Total learnable parameters of the architecture (spec §1.2).
PARAMETER_COUNT = 35_075_792

#: Every spatial side of the input must be a multiple of this (4 poolings; the concatenations of
#: up-sampled coarse maps with finer ones only line up then).
INPUT_MULTIPLE = 16

# (name, in, out) in registration order. "t2" / "t4" mark transposed convolutions that enlarge by
# 2 or 4; everything else is a 3x3 same-size convolution.
_LAYERS: tuple[tuple[str, int, int, str], ...] = (
    ("conv1_1", 3, 64, "c"),
    ("conv1_2", 64, 64, "c"),
    ("conv2_1", 64, 128, "c"),
    ("conv2_2", 128, 128, "c"),
    ("conv3_1", 128, 256, "c"),
    ("conv3_2", 256, 256, "c"),
    ("conv3_3", 256, 256, "c"),
    ("conv4_1", 256, 512, "c"),
    ("conv4_2", 512, 512, "c"),
    ("conv4_3", 512, 512, "c"),
    ("conv5_1", 512, 512, "c"),
    ("conv5_2", 512, 512, "c"),
    ("conv5_3", 512, 512, "c"),
    ("convA_1", 256, 256, "c"),
    ("convA_2", 256, 128, "c"),
    ("convA_3", 128, 64, "c"),
    ("convA_4", 64, 32, "c"),
    ("convA_5", 32, 4, "c"),
    ("convB_1", 512, 256, "c"),
    ("convB_2", 256, 128, "c"),
    ("convB_3", 128, 64, "c"),
    ("convB_4", 64, 32, "c"),
    ("convB_5", 32, 4, "c"),
    ("convC_1", 384, 256, "c"),
    ("convC_2", 256, 128, "c"),
    ("convC_3", 128, 64, "c"),
    ("convC_4", 64, 32, "c"),
    ("convC_5", 32, 4, "c"),
    ("convD_1", 256, 256, "c"),
    ("convD_2", 256, 128, "c"),
    ("convD_3", 128, 64, "c"),
    ("convD_4", 64, 32, "c"),
    ("convD_5", 32, 4, "c"),
    ("conv_before_transpose_1", 512, 256, "c"),
    ("transpose_1", 256, 256, "t2"),
    ("conv_after_transpose_1_1", 256, 256, "c"),
    ("transpose_2", 256, 256, "t2"),
    ("conv_after_transpose_2_1", 256, 128, "c"),
    ("transpose_3", 256, 256, "t4"),
    ("conv_after_transpose_3_1", 256, 128, "c"),
    ("transpose_4_1_a", 256, 256, "t4"),
    ("transpose_4_1_b", 256, 256, "t2"),
    ("conv_after_transpose_4_1", 256, 64, "c"),
    ("transpose_4_2", 256, 256, "t4"),
    ("conv_after_transpose_4_2", 256, 64, "c"),
    ("transpose_4_3", 128, 128, "t2"),
    ("conv_after_transpose_4_3", 128, 64, "c"),
    ("conv_middle_1", 256, 512, "c"),
    ("conv_middle_2", 512, 512, "c"),
    ("conv_middle_3", 512, 512, "c"),
    ("conv_mid_4", 512, 256, "c"),
    ("conv_lowest_1", 128, 256, "c"),
    ("conv_lowest_2", 256, 256, "c"),
    ("conv_lowest_3", 256, 256, "c"),
    ("conv_lowest_4", 256, 128, "c"),
    ("conv_scale1_1", 64, 128, "c"),
    ("conv_scale1_2", 128, 128, "c"),
    ("conv_scale1_3", 128, 64, "c"),
)


def _make_layer(in_ch: int, out_ch: int, kind: str) -> nn.Module:
    if kind == "c":
        return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1)
    if kind == "t2":
        return nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1)
    if kind == "t4":
        # With stride 4 and a 3-wide kernel every 4th output row/column only gets the bias. That is
        # what the trained weights saw, so the standard op is used as is (spec §1.1).
        return nn.ConvTranspose2d(in_ch, out_ch, 3, stride=4, padding=0, output_padding=1)
    raise ValueError(f"unknown layer kind {kind!r}")


def _relu(x: torch.Tensor) -> torch.Tensor:
    # In place: every ReLU input is a fresh conv output nobody else holds, and on big photos the
    # saved allocation is hundreds of MB.
    return F.relu(x, inplace=True)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=2, stride=2)


class LSCCNN(nn.Module):
    """LSC-CNN ``scale_4``: VGG-16 trunk, three extra branches, top-down paths, four heads.

    ``forward(x)`` takes ``N x 3 x H x W`` RGB 0-255 floats (H, W multiples of 16) and returns the
    raw logits ``(O0, O1, O2, O3)`` of shapes ``N x 4 x H/16 x W/16`` ... ``N x 4 x H/2 x W/2``.
    The caller's tensor is never modified. Works with any batch size, under ``torch.autocast``,
    after ``.half()`` and with ``channels_last`` inputs.
    """

    def __init__(self) -> None:
        super().__init__()
        for name, in_ch, out_ch, kind in _LAYERS:
            self.add_module(name, _make_layer(in_ch, out_ch, kind))

    def _c(self, name: str, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        y = self._modules[name](x)  # type: ignore[misc]
        return _relu(y) if relu else y

    def _chain(self, names: tuple[str, ...], x: torch.Tensor, last_relu: bool = True) -> torch.Tensor:
        for k, name in enumerate(names):
            x = self._c(name, x, relu=last_relu or k < len(names) - 1)
        return x

    def _head(self, letter: str, x: torch.Tensor) -> torch.Tensor:
        # The last conv of each head emits logits: no ReLU there.
        return self._chain(tuple(f"conv{letter}_{k}" for k in range(1, 6)), x, last_relu=False)

    def subtract_means(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` minus the channel means (a new tensor; ``x`` is left untouched).

        The subtraction is done in float32 whatever the input dtype: a half input holds 0-255
        integers exactly, and rounding once after the subtraction keeps the 0.008 fractions as far
        as the half format allows instead of first rounding the means themselves.
        """
        # Scalars, not a means tensor: building that tensor on a GPU is a blocking host-to-device
        # copy, which would stall every batch until the previous one had finished. The scalars
        # are rounded to float32 exactly as the tensor's elements were.
        out = x.to(torch.float32, copy=True)
        for channel, mean in enumerate(CHANNEL_MEANS):
            out[:, channel].sub_(mean)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``(O0, O1, O2, O3)`` at 1/16, 1/8, 1/4, 1/2 resolution (spec §1.3)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an N x 3 x H x W tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE or h == 0 or w == 0:
            raise ValueError(f"input height and width must be positive multiples of 16, got {h}x{w}")

        x = self.subtract_means(x)

        # VGG-16 trunk; P1..P3 feed the finer branches.
        p1 = _pool(self._chain(("conv1_1", "conv1_2"), x))
        p2 = _pool(self._chain(("conv2_1", "conv2_2"), p1))
        p3 = _pool(self._chain(("conv3_1", "conv3_2", "conv3_3"), p2))
        p4 = _pool(self._chain(("conv4_1", "conv4_2", "conv4_3"), p3))
        f16 = self._chain(("conv5_1", "conv5_2", "conv5_3", "conv_before_transpose_1"), p4)
        del p4

        # Stage 1 (1/16).
        o0 = self._head("A", f16)

        # Stage 2 (1/8): branch from P3 + top-down from F16, concatenated in that order.
        m8 = self._chain(("conv_middle_1", "conv_middle_2", "conv_middle_3", "conv_mid_4"), p3)
        del p3
        up = self._chain(("transpose_1", "conv_after_transpose_1_1"), f16)
        o1 = self._head("B", torch.cat((m8, up), dim=1))
        del up

        # Stage 3 (1/4): branch from P2 + top-down from M8 (not from O1) and from F16.
        l4 = self._chain(("conv_lowest_1", "conv_lowest_2", "conv_lowest_3", "conv_lowest_4"), p2)
        del p2
        from_m8 = self._chain(("transpose_2", "conv_after_transpose_2_1"), m8)
        from_f16 = self._chain(("transpose_3", "conv_after_transpose_3_1"), f16)
        o2 = self._head("C", torch.cat((l4, from_m8, from_f16), dim=1))
        del from_m8, from_f16

        # Stage 4 (1/2): branch from P1 + top-down from F16 (x4 then x2), M8 and L4.
        s2 = self._chain(("conv_scale1_1", "conv_scale1_2", "conv_scale1_3"), p1)
        del p1
        from_f16 = self._chain(("transpose_4_1_a", "transpose_4_1_b", "conv_after_transpose_4_1"), f16)
        del f16
        from_m8 = self._chain(("transpose_4_2", "conv_after_transpose_4_2"), m8)
        del m8
        from_l4 = self._chain(("transpose_4_3", "conv_after_transpose_4_3"), l4)
        del l4
        o3 = self._head("D", torch.cat((s2, from_f16, from_m8, from_l4), dim=1))
        return o0, o1, o2, o3


def state_dict_manifest() -> list[tuple[str, tuple[int, ...]]]:
    """``(key, shape)`` of every state_dict tensor, in order, without allocating any weights."""
    with torch.device("meta"):
        net = LSCCNN()
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
