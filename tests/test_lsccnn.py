"""Tests of the clean-room LSC-CNN locator against /work/shared/lsccnn-spec.md §6.

Everything runs on CPU with random weights; no real checkpoint is needed. Checkpoint files are
generated in pytest's tmp_path (140-280 MB each) and never committed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anonymiser.errors import WeightsError
from anonymiser.locators.base import Detections, HeadLocator
from anonymiser.locators import lsccnn_checkpoint as ckpt
from anonymiser.locators import lsccnn_decode
from anonymiser.locators.lsccnn import (
    LSCCNNLocator,
    available,
    network_size,
    plan_tiles,
    prepare_input,
    reference_detect,
    to_original,
)
from anonymiser.locators.lsccnn_decode import (
    BOX_SIZE_BINS,
    BOXES,
    GridDetections,
    decode,
    decode_probabilities,
    softmax_channels,
    winning_class,
)
from anonymiser.locators.lsccnn_net import LSCCNN, PARAMETER_COUNT, state_dict_manifest
from lsccnn_generated import he_init

# --------------------------------------------------------------------------------------------
# (a) the key/shape manifest, transcribed from the table of spec §1.2 (registration order)
# --------------------------------------------------------------------------------------------

SPEC_MANIFEST: list[tuple[str, tuple[int, ...]]] = [
    ("conv1_1.weight", (64, 3, 3, 3)),
    ("conv1_1.bias", (64,)),
    ("conv1_2.weight", (64, 64, 3, 3)),
    ("conv1_2.bias", (64,)),
    ("conv2_1.weight", (128, 64, 3, 3)),
    ("conv2_1.bias", (128,)),
    ("conv2_2.weight", (128, 128, 3, 3)),
    ("conv2_2.bias", (128,)),
    ("conv3_1.weight", (256, 128, 3, 3)),
    ("conv3_1.bias", (256,)),
    ("conv3_2.weight", (256, 256, 3, 3)),
    ("conv3_2.bias", (256,)),
    ("conv3_3.weight", (256, 256, 3, 3)),
    ("conv3_3.bias", (256,)),
    ("conv4_1.weight", (512, 256, 3, 3)),
    ("conv4_1.bias", (512,)),
    ("conv4_2.weight", (512, 512, 3, 3)),
    ("conv4_2.bias", (512,)),
    ("conv4_3.weight", (512, 512, 3, 3)),
    ("conv4_3.bias", (512,)),
    ("conv5_1.weight", (512, 512, 3, 3)),
    ("conv5_1.bias", (512,)),
    ("conv5_2.weight", (512, 512, 3, 3)),
    ("conv5_2.bias", (512,)),
    ("conv5_3.weight", (512, 512, 3, 3)),
    ("conv5_3.bias", (512,)),
    ("convA_1.weight", (256, 256, 3, 3)),
    ("convA_1.bias", (256,)),
    ("convA_2.weight", (128, 256, 3, 3)),
    ("convA_2.bias", (128,)),
    ("convA_3.weight", (64, 128, 3, 3)),
    ("convA_3.bias", (64,)),
    ("convA_4.weight", (32, 64, 3, 3)),
    ("convA_4.bias", (32,)),
    ("convA_5.weight", (4, 32, 3, 3)),
    ("convA_5.bias", (4,)),
    ("convB_1.weight", (256, 512, 3, 3)),
    ("convB_1.bias", (256,)),
    ("convB_2.weight", (128, 256, 3, 3)),
    ("convB_2.bias", (128,)),
    ("convB_3.weight", (64, 128, 3, 3)),
    ("convB_3.bias", (64,)),
    ("convB_4.weight", (32, 64, 3, 3)),
    ("convB_4.bias", (32,)),
    ("convB_5.weight", (4, 32, 3, 3)),
    ("convB_5.bias", (4,)),
    ("convC_1.weight", (256, 384, 3, 3)),
    ("convC_1.bias", (256,)),
    ("convC_2.weight", (128, 256, 3, 3)),
    ("convC_2.bias", (128,)),
    ("convC_3.weight", (64, 128, 3, 3)),
    ("convC_3.bias", (64,)),
    ("convC_4.weight", (32, 64, 3, 3)),
    ("convC_4.bias", (32,)),
    ("convC_5.weight", (4, 32, 3, 3)),
    ("convC_5.bias", (4,)),
    ("convD_1.weight", (256, 256, 3, 3)),
    ("convD_1.bias", (256,)),
    ("convD_2.weight", (128, 256, 3, 3)),
    ("convD_2.bias", (128,)),
    ("convD_3.weight", (64, 128, 3, 3)),
    ("convD_3.bias", (64,)),
    ("convD_4.weight", (32, 64, 3, 3)),
    ("convD_4.bias", (32,)),
    ("convD_5.weight", (4, 32, 3, 3)),
    ("convD_5.bias", (4,)),
    ("conv_before_transpose_1.weight", (256, 512, 3, 3)),
    ("conv_before_transpose_1.bias", (256,)),
    ("transpose_1.weight", (256, 256, 3, 3)),
    ("transpose_1.bias", (256,)),
    ("conv_after_transpose_1_1.weight", (256, 256, 3, 3)),
    ("conv_after_transpose_1_1.bias", (256,)),
    ("transpose_2.weight", (256, 256, 3, 3)),
    ("transpose_2.bias", (256,)),
    ("conv_after_transpose_2_1.weight", (128, 256, 3, 3)),
    ("conv_after_transpose_2_1.bias", (128,)),
    ("transpose_3.weight", (256, 256, 3, 3)),
    ("transpose_3.bias", (256,)),
    ("conv_after_transpose_3_1.weight", (128, 256, 3, 3)),
    ("conv_after_transpose_3_1.bias", (128,)),
    ("transpose_4_1_a.weight", (256, 256, 3, 3)),
    ("transpose_4_1_a.bias", (256,)),
    ("transpose_4_1_b.weight", (256, 256, 3, 3)),
    ("transpose_4_1_b.bias", (256,)),
    ("conv_after_transpose_4_1.weight", (64, 256, 3, 3)),
    ("conv_after_transpose_4_1.bias", (64,)),
    ("transpose_4_2.weight", (256, 256, 3, 3)),
    ("transpose_4_2.bias", (256,)),
    ("conv_after_transpose_4_2.weight", (64, 256, 3, 3)),
    ("conv_after_transpose_4_2.bias", (64,)),
    ("transpose_4_3.weight", (128, 128, 3, 3)),
    ("transpose_4_3.bias", (128,)),
    ("conv_after_transpose_4_3.weight", (64, 128, 3, 3)),
    ("conv_after_transpose_4_3.bias", (64,)),
    ("conv_middle_1.weight", (512, 256, 3, 3)),
    ("conv_middle_1.bias", (512,)),
    ("conv_middle_2.weight", (512, 512, 3, 3)),
    ("conv_middle_2.bias", (512,)),
    ("conv_middle_3.weight", (512, 512, 3, 3)),
    ("conv_middle_3.bias", (512,)),
    ("conv_mid_4.weight", (256, 512, 3, 3)),
    ("conv_mid_4.bias", (256,)),
    ("conv_lowest_1.weight", (256, 128, 3, 3)),
    ("conv_lowest_1.bias", (256,)),
    ("conv_lowest_2.weight", (256, 256, 3, 3)),
    ("conv_lowest_2.bias", (256,)),
    ("conv_lowest_3.weight", (256, 256, 3, 3)),
    ("conv_lowest_3.bias", (256,)),
    ("conv_lowest_4.weight", (128, 256, 3, 3)),
    ("conv_lowest_4.bias", (128,)),
    ("conv_scale1_1.weight", (128, 64, 3, 3)),
    ("conv_scale1_1.bias", (128,)),
    ("conv_scale1_2.weight", (128, 128, 3, 3)),
    ("conv_scale1_2.bias", (128,)),
    ("conv_scale1_3.weight", (64, 128, 3, 3)),
    ("conv_scale1_3.bias", (64,)),
]

#: BOXES of spec §3.2, copied from the table rather than recomputed.
SPEC_BOXES = [[16, 20, 24], [8, 10, 12], [4, 5, 6], [1, 2, 3]]


@pytest.fixture(scope="module")
def model() -> LSCCNN:
    torch.manual_seed(0)
    return he_init(LSCCNN()).eval()


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A random but spatially smooth RGB image (blobs rather than white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 10), max(2, w // 10), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_manifest_matches_spec_table(model: LSCCNN) -> None:
    assert len(SPEC_MANIFEST) == 116
    actual = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert actual == SPEC_MANIFEST
    assert state_dict_manifest() == SPEC_MANIFEST
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNT == 35_075_792
    # 58 parameterised modules, no buffers (the means are not state).
    assert len(list(model.children())) == 58
    assert list(model.buffers()) == []


# --------------------------------------------------------------------------------------------
# (b) forward shapes, no mutation, batch, channels_last, half precision
# --------------------------------------------------------------------------------------------


def test_forward_shapes_and_input_not_mutated(model: LSCCNN) -> None:
    x = torch.rand(1, 3, 224, 320) * 255
    before = x.clone()
    with torch.inference_mode():
        outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(1, 4, 14, 20), (1, 4, 28, 40), (1, 4, 56, 80), (1, 4, 112, 160)]
    assert torch.equal(x, before)


def test_forward_rejects_sizes_not_multiple_of_16(model: LSCCNN) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 4, 32, 32))


def test_means_are_subtracted_from_rgb_channels_in_spec_order(model: LSCCNN) -> None:
    x = torch.zeros(1, 3, 16, 16)
    y = model.subtract_means(x)
    assert torch.allclose(y[0, :, 0, 0], -torch.tensor([104.008, 116.669, 122.675]))
    assert torch.equal(x, torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_means_as_scalars_give_the_means_tensors_bits(model: LSCCNN, dtype: torch.dtype, channels_last: bool) -> None:
    """The means are subtracted as scalars (no tensor built on the GPU per pass, which is a
    blocking copy): bit for bit what subtracting a float32 means tensor gave, input untouched."""
    x = (torch.rand(2, 3, 16, 32) * 255).round().to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = x.clone()
    expected = (x.to(torch.float32) - torch.tensor([104.008, 116.669, 122.675]).view(1, 3, 1, 1)).to(dtype)
    assert torch.equal(model.subtract_means(x), expected)
    assert torch.equal(x, before)


def test_batch_and_channels_last_match_single_contiguous(model: LSCCNN) -> None:
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 48) * 255
    with torch.inference_mode():
        batched = model(x)
        singles = [model(x[k : k + 1]) for k in range(2)]
        nhwc = model(x.contiguous(memory_format=torch.channels_last))
    for s in range(4):
        for k in range(2):
            torch.testing.assert_close(batched[s][k], singles[k][s][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(nhwc[s], batched[s], rtol=1e-4, atol=1e-4)


def test_half_module_and_bfloat16_autocast_channels_last(model: LSCCNN) -> None:
    x = torch.rand(1, 3, 16, 32) * 255
    with torch.inference_mode():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(x.contiguous(memory_format=torch.channels_last))
        half = copy.deepcopy(model).half()(x.half())  # a copy: the fixture stays float32
    for ref, low, dtype in [(r, a, torch.bfloat16) for r, a in zip(reference, amp)] + [
        (r, h, torch.float16) for r, h in zip(reference, half)
    ]:
        assert low.dtype == dtype and low.shape == ref.shape
        torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
    assert next(model.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# (c) checkpoint formats
# --------------------------------------------------------------------------------------------


def _assert_bit_identical(state: "OrderedDict[str, torch.Tensor]", model: LSCCNN) -> None:
    reference = model.state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert state[key].dtype == torch.float32
        assert torch.equal(state[key], value), key


@pytest.fixture(scope="module")
def bare_checkpoint(model: LSCCNN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "bare.pth"
    ckpt.write_bare_state_dict(model, path)
    return path


def _load(path: Path, **kwargs: object) -> "OrderedDict[str, torch.Tensor]":
    return ckpt.load_state_dict(path, expected_size=path.stat().st_size, expected_md5=_md5(path), **kwargs)


def test_wrapped_bare_and_prefixed_checkpoints_load_identically(
    model: LSCCNN, bare_checkpoint: Path, tmp_path: Path
) -> None:
    wrapped, bare, prefixed = tmp_path / "wrapped.pth", bare_checkpoint, tmp_path / "module.pth"
    ckpt.write_official_format_checkpoint(model, wrapped, include_optimizer=False)
    ckpt.write_bare_state_dict(model, prefixed, key_prefix="module.")
    for path in (wrapped, bare, prefixed):
        with open(path, "rb") as fh:
            assert ckpt.sniff_format(fh.read(16)) == "legacy"
        _assert_bit_identical(_load(path), model)

    loaded = ckpt.load_model(bare, expected_size=bare.stat().st_size, expected_md5=_md5(bare))
    assert not loaded.training
    _assert_bit_identical(OrderedDict(loaded.state_dict()), model)

    # An explicitly unverified file is accepted only with the opt-in flag, and never without it.
    with pytest.raises(WeightsError, match="checksum"):
        ckpt.load_state_dict(bare, expected_size=None, expected_md5=None)
    unverified = ckpt.load_state_dict(bare, expected_size=None, expected_md5=None, trust_unverified=True)
    _assert_bit_identical(unverified, model)

    # The locator loads the same file and keeps the weights.
    locator = LSCCNNLocator(bare, device="cpu", expected_size=bare.stat().st_size, expected_md5=_md5(bare))
    _assert_bit_identical(OrderedDict(locator.model.state_dict()), model)


def test_full_size_official_format_checkpoint(model: LSCCNN, tmp_path: Path) -> None:
    """The ~280 MB wrapped checkpoint with SGD momentum buffers (runs by default; tmp_path only)."""
    path = tmp_path / ckpt.OFFICIAL_FILENAME
    ckpt.write_official_format_checkpoint(model, path, include_optimizer=True)
    size = path.stat().st_size
    # Same container as the official file: within 0.01 % of its size (spec §1.4 measured -0.0005 %).
    assert abs(size - ckpt.OFFICIAL_SIZE) / ckpt.OFFICIAL_SIZE < 1e-4
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 46 and len(raw["optimizer"]["state"]) == 116
    _assert_bit_identical(_load(path), model)
    # With the default (official) checksums this generated file is refused.
    with pytest.raises(WeightsError):
        ckpt.load_state_dict(path)
    assert available(tmp_path)


def test_weights_only_fallback_only_for_the_official_md5(
    model: LSCCNN, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint that also pickles a non-tensor object (as some training scripts store args):
    # weights_only=True refuses it.
    path = tmp_path / "with_args.pth"
    torch.save(
        {"epoch": 46, "state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.001)},
        path,
        _use_new_zipfile_serialization=False,
        pickle_protocol=2,
    )
    calls: list[bool] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(bool(kwargs.get("weights_only")))
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(WeightsError, match="plain tensors"):
        _load(path)
    assert calls == [True]

    calls.clear()
    monkeypatch.setattr(ckpt, "OFFICIAL_MD5", _md5(path))
    _assert_bit_identical(_load(path), model)
    assert calls == [True, False]


# --------------------------------------------------------------------------------------------
# (d) refusal before unpickling, damaged files, wrong architecture
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("torch.load must not be called for a file that failed verification")

    monkeypatch.setattr(torch, "load", boom)


def _fake_legacy_file(path: Path, size: int = 4096) -> Path:
    path.write_bytes(b"\x80\x02" + ckpt._LEGACY_MAGIC + os.urandom(size - 14))
    return path


def test_wrong_size_refused_before_torch_load(tmp_path: Path, no_torch_load: None) -> None:
    path = _fake_legacy_file(tmp_path / ckpt.OFFICIAL_FILENAME)
    with pytest.raises(WeightsError, match="4,096 bytes, expected 280,644,611"):
        ckpt.load_state_dict(path)
    with pytest.raises(WeightsError, match="bytes, expected"):
        ckpt.load_state_dict(path, expected_size=4095, expected_md5=_md5(path))


def test_wrong_md5_refused_before_torch_load(tmp_path: Path, no_torch_load: None) -> None:
    path = _fake_legacy_file(tmp_path / "x.pth")
    with pytest.raises(WeightsError, match="md5"):
        ckpt.load_state_dict(path, expected_size=4096, expected_md5="0" * 32)
    # Official size but not the official bytes.
    with pytest.raises(WeightsError, match="md5"):
        ckpt.load_state_dict(path, expected_size=None)


def test_garbage_and_missing_files_refused(tmp_path: Path, no_torch_load: None) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        ckpt.load_state_dict(garbage, expected_size=None, expected_md5=None, trust_unverified=True)
    with pytest.raises(WeightsError, match="not found"):
        ckpt.load_state_dict(tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="not found"):
        LSCCNNLocator(weights_dir=tmp_path, device="cpu")
    assert not available(tmp_path)


def test_truncated_and_damaged_files_refused_cleanly(bare_checkpoint: Path, tmp_path: Path) -> None:
    data = bare_checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        _load(truncated)  # checksums of the damaged file itself: only unpickling can notice
    zip_junk = tmp_path / "zip_junk.pth"
    zip_junk.write_bytes(b"PK\x03\x04" + os.urandom(1000))
    with pytest.raises(WeightsError):
        _load(zip_junk)


def test_wrong_architecture_lists_keys() -> None:
    with torch.device("meta"):
        state = dict(LSCCNN().state_dict())
    state.pop("convD_5.bias")
    state["fc.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"1 missing keys \['convD_5.bias'\].*1 unexpected keys \['fc.weight'\]"):
        ckpt.validate_state_dict(state)
    state = {k: torch.zeros(s) for k, s in SPEC_MANIFEST[:2]}
    with pytest.raises(WeightsError, match="114 missing"):
        ckpt.validate_state_dict(state)
    full = {k: torch.zeros(s) for k, s in SPEC_MANIFEST}
    full["conv1_1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(WeightsError, match="conv1_1.weight' has shape"):
        ckpt.validate_state_dict(full)
    full["conv1_1.weight"] = torch.full((64, 3, 3, 3), float("nan"))
    with pytest.raises(WeightsError, match="NaN"):
        ckpt.validate_state_dict(full)


# --------------------------------------------------------------------------------------------
# (e) decoder golden tests on hand-built logits
# --------------------------------------------------------------------------------------------

STRIDES = (16, 8, 4, 2)


def _background(h: int, w: int) -> list[np.ndarray]:
    """Logits of an H x W input where every cell of every scale is confidently background."""
    maps = []
    for d in STRIDES:
        m = np.zeros((4, h // d, w // d), np.float32)
        m[3] = 10.0
        maps.append(m)
    return maps


def test_box_bins_follow_the_construction() -> None:
    assert list(BOX_SIZE_BINS) == [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24]
    assert [list(r) for r in BOXES] == SPEC_BOXES


@pytest.mark.parametrize("s", range(4))
@pytest.mark.parametrize("c", range(3))
def test_single_peak_lands_top_left_with_spec_side(s: int, c: int) -> None:
    logits = _background(128, 96)
    i, j = 3, 2
    logits[s][c, i, j] = 20.0
    det = decode(logits)
    assert len(det) == 1
    x1, y1, x2, y2 = det.pixel_boxes()[0]
    assert ((x1 + x2) / 2, (y1 + y2) / 2) == (j * 16 / 2**s, i * 16 / 2**s)
    assert x2 - x1 == y2 - y1 == 2 * SPEC_BOXES[s][c]
    assert det.scale[0] == s and det.score[0] > 0.99


def _tie(scales: tuple[int, ...], boost: dict[int, float] | None = None) -> int:
    """Side of the winner when ``scales`` fire class 0 at grid point (8, 8) (cell (8/f, 8/f))."""
    logits = _background(64, 64)
    for s in scales:
        f = 8 >> s
        logits[s][0, 8 // f, 8 // f] = 20.0 + (boost or {}).get(s, 0.0)
    det = decode(logits)
    assert len(det) == 1 and (det.y[0], det.x[0]) == (8, 8)
    return int(det.side[0])


def test_cross_scale_tie_priority_and_higher_score_wins() -> None:
    assert _tie((0, 1, 2, 3)) == 8  # s1 > s0
    assert _tie((0, 2, 3)) == 16  # s0 > s2
    assert _tie((2, 3)) == 4  # s2 > s3
    assert _tie((0, 1, 2, 3), boost={3: 0.5}) == 1  # a strictly higher score wins whatever scale
    assert _tie((0, 1), boost={0: 0.5}) == 16


def test_nms_containment_suppresses_even_at_threshold_one() -> None:
    logits = _background(64, 64)
    logits[0][2, 1, 1] = 20.0  # s0, b=24 at grid (8, 8)
    logits[3][0, 9, 9] = 19.0  # s3, b=1 at grid (9, 9): inside the large box, lower score
    det = decode(logits, nms_threshold=1.0)
    assert det.side.tolist() == [24]
    logits[3][0, 9, 9] = 21.0  # now the small box comes first and the containing box goes
    det = decode(logits, nms_threshold=1.0)
    assert det.side.tolist() == [1]


def test_nms_keeps_when_iou_equals_threshold() -> None:
    # Two b=4 boxes (s2 class 0) one s2 cell = 2 grid units apart, same row:
    # inter = (4 - 2 + 1) * (4 + 1) = 15, area = 25, IoU = 15 / 35 with the +1 convention.
    logits = _background(64, 64)
    logits[2][0, 4, 4] = 20.0
    logits[2][0, 4, 5] = 19.0
    iou = 15 / 35
    assert len(decode(logits, nms_threshold=iou)) == 2
    below = decode(logits, nms_threshold=float(np.nextafter(iou, 0)))
    assert below.x.tolist() == [8] and below.side.tolist() == [4]


def test_all_background_gives_nothing() -> None:
    det = decode(_background(96, 64))
    assert len(det) == 0 and det.pixel_boxes().shape == (0, 4)


def test_decode_rejects_inconsistent_maps() -> None:
    logits = _background(64, 64)
    logits[1] = logits[1][:, :-1]
    with pytest.raises(ValueError, match="map 1"):
        decode(logits)


def test_softmax_matches_float64_definition() -> None:
    z = np.random.default_rng(3).normal(0, 5, (4, 7, 9)).astype(np.float32)
    ref = np.exp(z.astype(np.float64)) / np.exp(z.astype(np.float64)).sum(0)
    p = softmax_channels(z)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# (f) differential test against a deliberately naive decoder that follows the spec literally
# --------------------------------------------------------------------------------------------


def _naive_sparse_upsample(m: np.ndarray) -> np.ndarray:
    """One x2 step of the spec's sparse operator, cell by cell."""
    c, h, w = m.shape
    out = np.zeros((c, 2 * h, 2 * w), np.float32)
    for i in range(h):
        for j in range(w):
            out[:, 2 * i, 2 * j] = m[:, i, j]
            for di, dj in ((0, 1), (1, 0), (1, 1)):
                out[3, 2 * i + di, 2 * j + dj] = 1.0  # box channels stay 0
    return out


def _naive_decode(probs: list[np.ndarray], thr: float) -> list[tuple[int, int, int, float]]:
    """(y, x, b, score) of kept detections, in row-major order, computed the slow literal way."""
    gh, gw = probs[3].shape[1:]
    per_scale = []
    for s in range(4):
        m = probs[s]
        for _ in range(3 - s):
            m = _naive_sparse_upsample(m)
        assert m.shape[1:] == (gh, gw)
        score = np.zeros((gh, gw), np.float32)
        box = np.zeros((gh, gw), np.int64)
        for y in range(gh):
            for x in range(gw):
                values = [m[k, y, x] for k in range(4)]
                label = 0
                for k in range(1, 4):
                    if values[k] > values[label]:  # strict: the first index wins ties
                        label = k
                if label != 3:
                    score[y, x] = values[label]
                    box[y, x] = SPEC_BOXES[s][label]
        per_scale.append((score, box))

    def merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        score, box = np.zeros_like(a[0]), np.zeros_like(a[1])
        for y in range(gh):
            for x in range(gw):
                sa, sb = a[0][y, x], b[0][y, x]
                if sa > 0 and sb > 0:
                    pick = a if sa > sb else b
                elif sa > 0:
                    pick = a
                elif sb > 0:
                    pick = b
                else:
                    continue
                score[y, x], box[y, x] = pick[0][y, x], pick[1][y, x]
        return score, box

    m1 = merge(per_scale[0], per_scale[1])
    m2 = merge(per_scale[2], m1)
    final_score, final_box = merge(per_scale[3], m2)

    cands = [
        (y, x, int(final_box[y, x]), final_score[y, x])
        for y in range(gh)
        for x in range(gw)
        if final_score[y, x] > 0
    ]
    if not cands:
        return []
    scores = np.array([c[3] for c in cands], np.float32)
    remaining = list(np.argsort(scores)[::-1])
    kept = []
    while remaining:
        i = remaining[0]
        kept.append(i)
        yi, xi, bi, _ = cands[i]
        ax1, ax2, ay1, ay2 = xi - bi / 2, xi + bi / 2, yi - bi / 2, yi + bi / 2
        area_i = (ax2 - ax1 + 1) * (ay2 - ay1 + 1)
        survivors = []
        for j in remaining[1:]:
            yj, xj, bj, _ = cands[j]
            bx1, bx2, by1, by2 = xj - bj / 2, xj + bj / 2, yj - bj / 2, yj + bj / 2
            area_j = (bx2 - bx1 + 1) * (by2 - by1 + 1)
            inter = max(0.0, min(ax2, bx2) - max(ax1, bx1) + 1) * max(0.0, min(ay2, by2) - max(ay1, by1) + 1)
            iou = inter / (area_i + area_j - inter)
            if inter == area_i or inter == area_j:
                continue  # one box inside the other: suppressed whatever the threshold
            if iou <= thr:
                survivors.append(j)
        remaining = survivors
    return [(int(cands[k][0]), int(cands[k][1]), cands[k][2], float(cands[k][3])) for k in sorted(kept)]


def _random_logits(h: int, w: int, seed: int, quantised: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = []
    for d in STRIDES:
        z = rng.normal(0, 1.5, (4, h // d, w // d)).astype(np.float32)
        z[3] += 0.8  # some background, as in real outputs
        if quantised:  # repeated logit vectors -> exactly equal scores across positions and scales
            z = np.round(z).astype(np.float32)
        maps.append(z)
    if quantised:  # also copy some coarse cells onto finer scales at shared grid points
        for s in (1, 2, 3):
            f = 1 << s
            maps[s][:, ::f, ::f][:, ::2, ::2] = maps[0][:, ::2, ::2]
    return maps


@pytest.mark.parametrize(
    ("h", "w", "seed", "quantised", "thr"),
    [
        (64, 96, 0, False, 0.25),
        (96, 64, 1, True, 0.25),
        (128, 112, 2, False, 0.20),
        (80, 144, 3, True, 0.0),
        (48, 48, 4, True, 1.0),
        (112, 80, 5, False, 0.5),
    ],
)
def test_fast_decoder_equals_naive_decoder(h: int, w: int, seed: int, quantised: bool, thr: float) -> None:
    probs = [softmax_channels(z) for z in _random_logits(h, w, seed, quantised)]
    fast = decode_probabilities(probs, thr)
    naive = _naive_decode(probs, thr)
    assert len(naive) > 5
    got = list(zip(fast.y.tolist(), fast.x.tolist(), fast.side.tolist(), fast.score.tolist()))
    assert got == naive


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.0, 0.25, 0.5, 1.0])
def test_pairwise_nms_equals_the_greedy_loop(seed: int, thr: float) -> None:
    """The vectorised rounds over candidate pairs keep exactly the boxes the one-box-at-a-time
    greedy loop keeps, in the same order: crowded grids, every box size, many equal scores."""
    rng = np.random.default_rng(seed)
    gh, gw = 60, 90
    n = [50, 400, 1500, 3000, 200, 2500][seed]
    cells = rng.choice(gh * gw, n, replace=False)
    y, x = (cells // gw).astype(np.int64), (cells % gw).astype(np.int64)
    side = rng.choice(np.array(BOX_SIZE_BINS, np.int64), n)
    score = rng.random(n).astype(np.float32)
    if seed % 2:
        score = np.round(score * 8).astype(np.float32) / 8 + 0.01  # ties
    order = np.argsort(score)[::-1]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    half = side / 2.0
    boxes = (x - half, x + half, y - half, y + half)
    area = (boxes[1] - boxes[0] + 1.0) * (boxes[3] - boxes[2] + 1.0)
    loop = lsccnn_decode._nms_loop(order, rank, y, x, side, boxes, area, thr)
    fast = lsccnn_decode.nms(y, x, side, score, thr)
    assert fast.tolist() == loop.tolist()
    assert 0 < len(fast) < n


def test_nms_falls_back_to_the_loop_beyond_the_pair_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Too many candidate pairs (an untrained network's output) take the loop; same boxes."""
    probs = [softmax_channels(z) for z in _random_logits(96, 128, 7, True)]
    expected = decode_probabilities(probs, 0.25)
    monkeypatch.setattr(lsccnn_decode, "MAX_NMS_PAIRS", 0)
    calls: list[int] = []
    loop = lsccnn_decode._nms_loop
    monkeypatch.setattr(lsccnn_decode, "_nms_loop", lambda *a: calls.append(1) or loop(*a))
    fallback = decode_probabilities(probs, 0.25)
    assert calls and np.array_equal(fallback.y, expected.y) and np.array_equal(fallback.x, expected.x)
    assert np.array_equal(fallback.score, expected.score) and len(expected) > 5


def test_winning_class_is_numpy_argmax_and_max_exactly() -> None:
    """The plane-wise winner equals ``argmax(axis=0)`` (first index on ties) and ``max(axis=0)``
    bit for bit, on maps where most positions tie between two or more classes."""
    rng = np.random.default_rng(11)
    probs = softmax_channels(np.round(rng.normal(0, 1, (4, 37, 53))).astype(np.float32))
    probs[:, :5] = 0.25  # four-way ties
    label, conf = winning_class(probs)
    assert np.array_equal(label, probs.argmax(axis=0)) and np.array_equal(conf, probs.max(axis=0))
    ties = (probs == probs.max(axis=0)).sum(axis=0) > 1
    assert ties.mean() > 0.2


# --------------------------------------------------------------------------------------------
# preprocessing and coordinates
# --------------------------------------------------------------------------------------------


def test_network_size_and_resize() -> None:
    assert network_size(250, 300) == (240, 288)
    assert network_size(10, 64) == (16, 64)
    rgb = _smooth_image(250, 300, 0)
    net = prepare_input(rgb)
    assert net.shape == (240, 288, 3)
    np.testing.assert_array_equal(net, cv2.resize(rgb, (288, 240), interpolation=cv2.INTER_LINEAR))
    same = _smooth_image(64, 48, 1)
    assert prepare_input(same) is same
    with pytest.raises(ValueError):
        prepare_input(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        prepare_input(np.zeros((10, 10, 3), np.float32))


class _InputSpy(nn.Module):
    """Records what the locator feeds the network; predicts background everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.seen.append(x.clone())
        n, _, h, w = x.shape
        outs = []
        for d in STRIDES:
            o = torch.zeros(n, 4, h // d, w // d)
            o[:, 3] = 10.0
            outs.append(o)
        return tuple(outs)


def test_network_sees_rgb_0_255_float32() -> None:
    rgb = _smooth_image(40, 70, 4)  # -> 32 x 64
    spy = _InputSpy()
    bgr_view = np.ascontiguousarray(rgb[..., ::-1])[..., ::-1]  # RGB again, via a negative-stride view
    det = LSCCNNLocator.from_model(spy, device="cpu").locate(bgr_view)
    assert len(det) == 0
    (x,) = spy.seen
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 3, 32, 64)
    expected = cv2.resize(rgb, (64, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), expected)  # channel 0 = R, no /255
    assert x.max() > 1.0


def test_to_original_scales_and_clips() -> None:
    grid = GridDetections(
        y=np.array([10, 0]), x=np.array([20, 1]), side=np.array([8, 24]),
        score=np.array([0.9, 0.5], np.float32), scale=np.array([1, 0]),
    )
    det = to_original(grid, net_hw=(160, 320), orig_hw=(200, 400))
    np.testing.assert_allclose(det.boxes[0], [(40 - 8) * 1.25, (20 - 8) * 1.25, (40 + 8) * 1.25, (20 + 8) * 1.25])
    np.testing.assert_allclose(det.boxes[1], [0, 0, (2 + 24) * 1.25, 24 * 1.25])  # clipped at 0


class _LocalNet(nn.Module):
    """Stand-in network whose logits depend only on pixels inside each output cell.

    Tiled and whole-image runs must then agree bit for bit, which isolates the stitching logic.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(4, 4, 3, generator=g) * 4, requires_grad=False)
        self.b = nn.Parameter(torch.randn(4, 4, generator=g), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for s, d in enumerate(STRIDES):
            p = F.avg_pool2d(x / 255.0, d)
            w, b = self.w[s], self.b[s]
            channels = [p[:, 0] * w[c, 0] + p[:, 1] * w[c, 1] + p[:, 2] * w[c, 2] + b[c] for c in range(4)]
            outs.append(torch.stack(channels, 1))
        return tuple(outs)


class _SpotNet(nn.Module):
    """Fires (s3, b=3) wherever a 2x2 cell is bright; background everywhere else."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for d in STRIDES:
            p = F.avg_pool2d(x.mean(1, keepdim=True), d) / 255.0
            bg = torch.full_like(p, 10.0)
            box = 20.0 * p if d == 2 else torch.zeros_like(p)
            outs.append(torch.cat([torch.zeros_like(p), torch.zeros_like(p), box, bg], 1))
        return tuple(outs)


def test_boxes_are_mapped_back_to_original_coordinates() -> None:
    rgb = np.zeros((210, 330, 3), np.uint8)  # network input 208 x 320
    rgb[100:108, 150:158] = 255
    for locator in (
        LSCCNNLocator.from_model(_SpotNet(), device="cpu"),
        LSCCNNLocator.from_model(_SpotNet(), device="cpu", max_tile_pixels=208**2, tile_margin=96),
    ):
        det = locator.locate(rgb)
        assert len(det) >= 1
        cx, cy = (det.boxes[:, 0] + det.boxes[:, 2]) / 2, (det.boxes[:, 1] + det.boxes[:, 3]) / 2
        assert np.all((cx >= 148) & (cx <= 160) & (cy >= 98) & (cy <= 110)), (cx, cy)
        np.testing.assert_allclose(det.boxes[:, 2] - det.boxes[:, 0], 6 * 330 / 320, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# (g) tiling
# --------------------------------------------------------------------------------------------


def test_plan_tiles_partitions_and_bounds() -> None:
    for h, w, limit, margin in ((3008, 4000, 1_000_000, 128), (224, 320, 224 * 256, 96), (1088, 160, 100_000, 96)):
        tiles = plan_tiles(h, w, limit, margin)
        cover = np.zeros((h, w), np.int64)
        for t in tiles:
            assert t.pixels <= limit
            assert all(v % 16 == 0 for v in (t.y0, t.y1, t.x0, t.x1, t.cy0, t.cy1, t.cx0, t.cx1))
            assert t.y0 <= t.cy0 < t.cy1 <= t.y1 and t.x0 <= t.cx0 < t.cx1 <= t.x1
            # context: at least the margin on every side that is not the image border
            assert t.cy0 - t.y0 == min(margin, t.cy0) and t.x1 - t.cx1 == min(margin, w - t.cx1)
            cover[t.cy0 : t.cy1, t.cx0 : t.cx1] += 1
        assert np.all(cover == 1)  # cores partition the image
    assert len(plan_tiles(224, 320, 224 * 320, 96)) == 1


def test_tiled_equals_whole_image_for_a_local_network() -> None:
    net = _LocalNet(seed=7)
    rgb = _smooth_image(300, 500, seed=8)  # network input 288 x 496
    whole = LSCCNNLocator.from_model(net, device="cpu").locate(rgb)
    tiled_locator = LSCCNNLocator.from_model(net, device="cpu", max_tile_pixels=240 * 240, tile_margin=96)
    assert len(plan_tiles(288, 496, 240 * 240, 96)) > 4
    tiled = tiled_locator.locate(rgb)
    assert len(whole) > 50
    np.testing.assert_array_equal(tiled.boxes, whole.boxes)
    np.testing.assert_array_equal(tiled.scores, whole.scores)
    np.testing.assert_array_equal(whole.boxes, reference_detect(net, rgb).boxes)


def test_tiled_matches_whole_image_away_from_seams(model: LSCCNN) -> None:
    rgb = _smooth_image(230, 330, seed=5)  # network input 224 x 320, one vertical seam at x = 160
    sx = 330 / 320
    limit, margin = 224 * 256, 96
    tiles = plan_tiles(224, 320, limit, margin)
    assert [(t.cx0, t.cx1) for t in tiles] == [(0, 160), (160, 320)]

    whole = reference_detect(model, rgb)
    tiled = LSCCNNLocator.from_model(model, device="cpu", max_tile_pixels=limit, tile_margin=margin).locate(rgb)
    assert len(whole) > 100
    # Everything is in original-image pixels: inside the 330 x 230 frame, beyond the 320 x 224 input.
    for det in (whole, tiled):
        assert det.boxes[:, [0, 2]].max() <= 330 and det.boxes[:, [1, 3]].max() <= 230
        assert det.boxes.min() >= 0
    assert tiled.boxes[:, 2].max() > 320

    def far_from_seam(det: Detections) -> set[tuple[float, ...]]:
        cx = (det.boxes[:, 0] + det.boxes[:, 2]) / 2 / sx
        far = np.abs(cx - 160) > 96
        return {tuple(b) + (s,) for b, s in zip(det.boxes[far].tolist(), det.scores[far].tolist())}

    a, b = far_from_seam(whole), far_from_seam(tiled)
    assert len(a) > 50
    assert a == b
    both = {tuple(x) for x in whole.boxes.tolist()} & {tuple(x) for x in tiled.boxes.tolist()}
    assert len(both) >= 0.9 * max(len(whole), len(tiled))


# --------------------------------------------------------------------------------------------
# (h) batching, (i) reduced precision, protocol
# --------------------------------------------------------------------------------------------


def test_locate_batch_equals_one_by_one(model: LSCCNN) -> None:
    # Two share the 48 x 64 network size (one after the floor-resize), one runs alone.
    images = [_smooth_image(48, 64, 10), _smooth_image(50, 70, 11), _smooth_image(64, 48, 12)]
    locator = LSCCNNLocator.from_model(model, device="cpu")
    batched = locator.locate_batch(images)
    assert len(batched) == 3
    for rgb, det in zip(images, batched):
        single = locator.locate(rgb)
        np.testing.assert_array_equal(det.boxes, single.boxes)
        np.testing.assert_allclose(det.scores, single.scores, rtol=1e-5)
    assert locator.locate_batch([]) == []


def test_locate_batch_mixed_sizes_and_tiled_images_with_local_net() -> None:
    net = _LocalNet(seed=3)
    limit = 256 * 256
    locator = LSCCNNLocator.from_model(net, device="cpu", max_tile_pixels=limit, tile_margin=96)
    images = [_smooth_image(64, 64, k) for k in range(5)] + [_smooth_image(300, 260, 9), _smooth_image(33, 47, 10)]
    assert len(plan_tiles(288, 256, limit, 96)) == 2  # the 300 x 260 image is tiled
    batched = locator.locate_batch(images)
    for rgb, det in zip(images, batched):
        single = locator.locate(rgb)
        np.testing.assert_array_equal(det.boxes, single.boxes)
        np.testing.assert_array_equal(det.scores, single.scores)


def test_bfloat16_locator_on_cpu(model: LSCCNN) -> None:
    # CPUs without native bf16 emulate it slowly, hence the tiny image.
    rgb = _smooth_image(32, 48, 20)
    locator = LSCCNNLocator.from_model(model, device="cpu", autocast_dtype=torch.bfloat16)
    det = locator.locate(rgb)
    assert isinstance(det, Detections)
    assert det.boxes.dtype == np.float32 and det.boxes.shape[1] == 4 and len(det.scores) == len(det)
    # half=True is a CUDA option: on CPU it leaves the network in float32.
    assert LSCCNNLocator.from_model(model, device="cpu", half=True).autocast_dtype is None


class _OverflowingNet(_SpotNet):
    """``_SpotNet`` whose logits overflow to infinity under autocast (as fp16 past 65504 does),
    and are finite in float32; or always NaN with ``broken`` (corrupt weights)."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.broken = broken

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = super().forward(x)
        if self.broken:
            return tuple(torch.full_like(o, float("nan")) for o in outs)
        if torch.is_autocast_enabled("cpu"):
            return tuple(torch.where(o > 5, torch.full_like(o, float("inf")), o) for o in outs)
        return outs


def test_non_finite_logits_are_rerun_or_refused_never_taken_for_no_heads() -> None:
    """A NaN or infinite logit matches no class in the softmax and decoded as background: heads
    vanished without an error. Under autocast the batch is run again in float32 (as the batched
    engine does); logits that are not finite even then are refused as a worker fault."""
    rgb = np.zeros((210, 330, 3), np.uint8)
    rgb[100:108, 150:158] = 255
    reference = LSCCNNLocator.from_model(_SpotNet(), device="cpu").locate(rgb)
    assert len(reference) >= 1
    rerun = LSCCNNLocator.from_model(_OverflowingNet(), device="cpu", autocast_dtype=torch.bfloat16).locate(rgb)
    np.testing.assert_array_equal(rerun.boxes, reference.boxes)
    with pytest.raises(lsccnn_decode.NonFiniteLogits):
        LSCCNNLocator.from_model(_OverflowingNet(broken=True), device="cpu").locate(rgb)
    logits = [np.zeros((4, 8 // d, 8 // d), np.float32) for d in (1, 1, 1, 1)]
    logits[2][0, 1, 1] = np.nan
    with pytest.raises(lsccnn_decode.NonFiniteLogits):
        lsccnn_decode.decode(logits)


def test_locator_protocol_and_validation(model: LSCCNN) -> None:
    locator = LSCCNNLocator.from_model(model, device="cpu")
    assert isinstance(locator, HeadLocator)
    assert (locator.name, locator.kind) == ("lsccnn", "head")
    with pytest.raises(ValueError):
        LSCCNNLocator.from_model(model, device="cpu", nms_threshold=1.5)
    with pytest.raises(ValueError):
        LSCCNNLocator.from_model(model, device="cpu", tile_margin=64)
    with pytest.raises(ValueError):
        LSCCNNLocator.from_model(model, device="cpu", max_tile_pixels=100_000, tile_margin=160)
