"""The batched, bucketed LSC-CNN engine (``anonymiser/batching/``) against the fp32 reference.

Runs on CPU with a generated checkpoint (seeded random weights of the official shapes, written to
and loaded from a file like any checkpoint), or with the official checkpoint when it is in the
weights directory. Photos are small crops of the team's dev photos (read in place from
``ANON_EVAL_DIR``, never copied) or, when those are absent, of scikit-image's sample photos.

The criterion is the issue's: at least 99 % of boxes identical to the reference path's
(``reference_detect``: whole image, fp32, batch 1) and no reference head left uncovered. It is
asserted for float32 batching with padding. Half precision is *measured* here but held to a
looser bound, because random weights are a worst case for it: every logit layer sits near a
three-way tie (the generator scales the logit layers down to keep the softmax unsaturated), so
the rounding of 20+ bf16 layers flips many near-tie cells. Measured on this machine's dev crops:
bf16 94-95 % identical (13-28 heads uncovered out of 3.5-3.9 thousand), fp16 98.5-99.4 %
(3 uncovered); making the logits more decisive makes bf16 *worse* (66-88 %), so random weights
cannot stand in for the trained network here. With the official checkpoint the half-precision
comparison is ``bench/gpu.py``'s job. What holds the worker's path to the bar whatever the
checkpoint is the engine's checks against float32, tested below: a failed check switches the
engine to float32.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from anonymiser.batching.agreement import Agreement, agreement
from anonymiser.batching.engine import LSCCNNEngine, is_out_of_memory
from anonymiser.batching.micro_batcher import MicroBatcher
from anonymiser.batching.options import DEFAULT_CHECK_EVERY, EngineOptions
from anonymiser.errors import DeviceFailure
from anonymiser.locators import lsccnn_checkpoint as ckpt
from anonymiser.locators.lsccnn import LSCCNNLocator, plan_tiles, reference_detect
from anonymiser.locators.lsccnn_flops import lsccnn_flops
from anonymiser.locators.lsccnn_net import LSCCNN
from anonymiser.locators.registry import default_weights_dir
from imaging import EVAL_DIR
from lsccnn_generated import he_init
from test_lsccnn import _smooth_image

#: (height, width) of the crops: several share a bucket, two share a size, most are not
#: multiples of 16 (floor-resized like the reference), one is tall and one is tiny.
SIZES = [(78, 80), (54, 47), (48, 90), (63, 78), (63, 78), (68, 75), (52, 90), (74, 85), (88, 48),
         (40, 56), (60, 55), (30, 25)]


def _sources() -> list[np.ndarray]:
    files = sorted(EVAL_DIR.glob("*.jpg")) if EVAL_DIR.is_dir() else []
    if files:
        from PIL import Image

        return [np.asarray(Image.open(f).convert("RGB")) for f in files[: len(SIZES)]]
    from skimage import data

    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


def _sample_photos() -> list[np.ndarray]:
    sources = _sources()
    photos = []
    for k, (h, w) in enumerate(SIZES):
        src = sources[k % len(sources)]
        y, x = (src.shape[0] - h) * (k + 1) // (len(SIZES) + 1), (src.shape[1] - w) // 2
        photos.append(np.ascontiguousarray(src[y : y + h, x : x + w]))
    return photos


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return _sample_photos()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LSCCNN:
    """The official checkpoint if present, else a generated one loaded from its file."""
    official = default_weights_dir() / ckpt.OFFICIAL_FILENAME
    if official.is_file():
        return ckpt.load_model(official)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("generated") / "generated_lsccnn.pth"
    ckpt.write_bare_state_dict(he_init(LSCCNN()), path)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    model = ckpt.load_model(path, expected_size=path.stat().st_size, expected_md5=md5)
    path.unlink()
    return model


@pytest.fixture(scope="module")
def references(model: LSCCNN, photos: list[np.ndarray]) -> list:
    return [reference_detect(model, rgb) for rgb in photos]


def _engine(model: nn.Module, **options: object) -> LSCCNNEngine:
    """Engines get a model of their own (they hook into it); the reference keeps the fixture.
    No float32 checks unless a test asks: they would replace the reduced precision's boxes."""
    clone = LSCCNN()
    clone.load_state_dict(model.state_dict())
    defaults: dict[str, object] = {"device": "cpu", "max_batch": 4, "bucket_multiple": 64, "check_every": 0}
    return LSCCNNEngine(clone, EngineOptions(**{**defaults, **options}))


def _total(references: list, results: list, photos: list[np.ndarray]) -> Agreement:
    parts = [agreement(r, c, rgb.shape[:2]) for r, c, rgb in zip(references, results, photos)]
    return sum(parts[1:], parts[0])


def _padded_batches(engine: LSCCNNEngine, photos: list[np.ndarray]) -> int:
    pieces = [p for rgb in photos for p in engine.prepare(rgb).pieces]
    return sum(1 for members, hb, wb in engine.plan_batches(pieces) if any((p.h, p.w) != (hb, wb) for p in members))


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fp32_bucketed_batches_match_the_reference(model, photos, references, channels_last) -> None:
    engine = _engine(model, precision="fp32", channels_last=channels_last)
    assert _padded_batches(engine, photos) >= 3, "the photos must exercise padding"
    results = engine.detect(photos)
    total = _total(references, results, photos)
    assert total.reference > 500  # random weights: many detections, a demanding comparison
    assert total.identical_fraction >= 0.99, total
    assert total.uncovered == 0, total
    engine.close()


def test_padding_would_change_detections_without_the_masks(model, photos, references) -> None:
    """The comparison above is sensitive: padding without masking moves boxes near the edges."""
    engine = _engine(model, precision="fp32")
    for hook in engine._hooks:
        hook.remove()
    total = _total(references, engine.detect(photos), photos)
    assert total.identical_fraction < 0.99, total


def test_bf16_autocast_channels_last_measured(model, photos, references) -> None:
    engine = _engine(model, precision="bf16", channels_last=True)
    assert engine.autocast_dtype is torch.bfloat16
    total = _total(references, engine.detect(photos), photos)
    print(f"\nbf16 vs fp32 reference: {total.identical_fraction:.2%} identical, "
          f"{total.uncovered} of {total.reference} reference heads uncovered")
    # Random weights are a worst case for half precision (see the module docstring).
    assert total.identical_fraction >= 0.90, total
    assert total.uncovered <= 0.02 * total.reference, total


# -- checks of the reduced precision against float32 ------------------------------------------


def _one_by_one(batcher: MicroBatcher, photos: list[np.ndarray]) -> list:
    """Photos through the worker's path, one after another (a worker at low load)."""
    return [batcher.detect(rgb) for rgb in photos]


def test_a_failed_check_switches_the_engine_to_float32(model, photos, references) -> None:
    """The issue's bar for half precision (99 % identical boxes, no reference head uncovered)
    holds on the worker's path with random weights, which bf16 alone misses: the first
    photo's check finds bf16 leaving a float32 head uncovered, answers that photo with float32's
    boxes, and runs every later one in float32."""
    unchecked = MicroBatcher(_engine(model, precision="bf16"))
    plain = _total(references, _one_by_one(unchecked, photos), photos)
    unchecked.close()
    assert plain.uncovered > 0, plain  # what the checks are there for

    engine = _engine(model, precision="bf16", check_every=1000)
    checks: list = []
    engine.on_check = checks.append
    limit = engine.options.max_batch_pixels
    batcher = MicroBatcher(engine)
    results = _one_by_one(batcher, photos)
    batcher.close()
    total = _total(references, results, photos)
    print(f"\nbf16 with checks vs fp32 reference: {total.identical_fraction:.2%} identical, "
          f"{total.uncovered} of {total.reference} reference heads uncovered; first check: {checks[0].agreement}")
    assert total.identical_fraction >= 0.99 and total.uncovered == 0, total
    assert len(checks) == 1, checks
    first = checks[0]
    assert (first.precision, first.failed, first.fell_back) == ("bf16", True, True)
    assert first.agreement.uncovered > 0 or first.agreement.identical_fraction < 0.99, first
    assert first.agreement.reference == len(references[0].boxes)
    assert (engine.precision, engine.autocast_dtype, engine.fell_back) == ("fp32", None, True)
    # float32 activations take twice the memory of bf16 ones
    assert engine.options.max_batch_pixels == limit // 2
    assert engine.check_totals == first.agreement


def test_checks_take_one_photo_in_n_and_count_mode_keeps_the_precision(model, photos, references) -> None:
    chosen, refs = photos[:7], references[:7]
    plain = MicroBatcher(_engine(model, precision="bf16"))
    reduced = _one_by_one(plain, chosen)
    plain.close()
    engine = _engine(model, precision="bf16", check_every=3, check_action="count")
    checks: list = []
    engine.on_check = checks.append
    batcher = MicroBatcher(engine)
    results = _one_by_one(batcher, chosen)
    batcher.close()
    assert len(checks) == 3 and engine.precision == "bf16" and not engine.fell_back
    assert not any(c.fell_back for c in checks)
    for k, got in enumerate(results):
        # Checked photos (the 1st, 4th and 7th) are answered with float32's boxes; the others
        # with bf16's.
        expected = refs[k] if k % 3 == 0 else reduced[k]
        np.testing.assert_array_equal(got.boxes, expected.boxes)
    measured = [agreement(refs[k], reduced[k], chosen[k].shape[:2]) for k in (0, 3, 6)]
    assert [c.agreement for c in checks] == measured
    assert engine.check_totals == sum(measured[1:], measured[0])
    assert any(c.failed for c in checks)  # bf16 on random weights is below the bar


def test_photos_in_flight_at_a_fallback_are_run_again_in_float32(model, photos, references) -> None:
    """A photo whose bf16 logits came back before another photo's check switched the engine is
    not answered with them."""
    engine = _engine(model, precision="bf16", check_every=1000)
    prepared = [engine.prepare(rgb) for rgb in photos[:2]]
    for p in prepared:
        for piece in p.pieces:
            batch = engine.run_batch([piece], piece.h, piece.w)
            assert batch.reduced
            p.accept(piece, batch.logits(0), batch.reduced)
    engine._forward = None  # type: ignore[assignment]  # stands for a graph compiled for bf16
    first = engine.finish(prepared[0])
    assert engine.fell_back and engine._forward is engine.model
    second = engine.finish(prepared[1])
    for got, ref in zip((first, second), references[:2]):
        np.testing.assert_array_equal(got.boxes, ref.boxes)


def test_float32_engines_never_check_and_reduced_ones_do_by_default(model) -> None:
    assert _engine(model, precision="fp32", check_every=None).options.check_every == 0
    assert _engine(model, precision="fp32", check_every=5).options.check_every == 0
    for precision in ("bf16", "fp16", "tf32"):
        assert _engine(model, precision=precision, check_every=None).options.check_every == DEFAULT_CHECK_EVERY
    options = EngineOptions.from_env({"ANON_LSCCNN_CHECK_EVERY": "50", "ANON_LSCCNN_CHECK_ACTION": "Count"})
    assert (options.check_every, options.check_action) == (50, "count")
    with pytest.raises(ValueError) as raised:
        EngineOptions.from_env({"ANON_LSCCNN_CHECK_EVERY": "-1", "ANON_LSCCNN_CHECK_ACTION": "ignore"})
    assert "ANON_LSCCNN_CHECK_EVERY" in str(raised.value) and "ANON_LSCCNN_CHECK_ACTION" in str(raised.value)
    with pytest.raises(ValueError, match="ANON_LSCCNN_CHECK_EVERY"):
        EngineOptions.from_env({"ANON_LSCCNN_CHECK_EVERY": "often"})


def test_a_check_that_fails_on_the_device_is_a_device_failure(model, photos) -> None:
    engine = _engine(model, precision="bf16", check_every=1)
    batcher = MicroBatcher(engine)

    def lost(*_args: object, **_kwargs: object) -> list[np.ndarray]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.run_float32 = lost  # type: ignore[method-assign]
    with pytest.raises(DeviceFailure, match="float32 pass.*illegal memory access"):
        batcher.detect(photos[0])
    batcher.close()


def test_a_broken_check_callback_never_costs_the_answer(model, photos, references) -> None:
    engine = _engine(model, precision="bf16", check_every=1, check_action="count")
    engine.on_check = lambda check: 1 / 0  # type: ignore[assignment, func-returns-value]
    batcher = MicroBatcher(engine)
    np.testing.assert_array_equal(batcher.detect(photos[0]).boxes, references[0].boxes)
    batcher.close()


def test_fp16_overflow_is_rerun_in_fp32() -> None:
    torch.manual_seed(3)
    net = he_init(LSCCNN()).eval()
    with torch.no_grad():
        net.conv1_1.weight.mul_(1e4)  # activations far beyond fp16's 65504
    rgb = _smooth_image(32, 48, 7)
    reference = reference_detect(net, rgb)
    engine = _engine(net, precision="fp16")
    (result,) = engine.detect([rgb])
    assert engine.overflows == 1
    total = agreement(reference, result, rgb.shape[:2])
    assert total.identical_fraction >= 0.99 and total.uncovered == 0, total


def test_fp16_overflow_rerun_keeps_shapes_repeating(monkeypatch) -> None:
    """With shapes that must repeat (the CUDA default), the float32 rerun is padded to the
    piece's bucket like any batch, not run at the photo's own size (a new shape for cuDNN's
    autotuning at every photo size), and still gives the reference's boxes."""
    torch.manual_seed(3)
    net = he_init(LSCCNN()).eval()
    with torch.no_grad():
        net.conv1_1.weight.mul_(1e4)
    rgb = _smooth_image(32, 48, 7)
    reference = reference_detect(net, rgb)
    engine = _engine(net, precision="fp16", shape_stable=True)
    shapes: list[tuple[int, int, int, str | None]] = []
    real = engine.run_batch

    def recording(pieces, hb, wb, precision=None, deadline=None):  # type: ignore[no-untyped-def]
        shapes.append((len(pieces), hb, wb, precision))
        return real(pieces, hb, wb, precision, deadline)

    monkeypatch.setattr(engine, "run_batch", recording)
    (result,) = engine.detect([rgb])
    assert engine.overflows == 1
    assert shapes == [(1, 64, 64, None), (1, 64, 64, "fp32")]
    total = agreement(reference, result, rgb.shape[:2])
    assert total.identical_fraction >= 0.99 and total.uncovered == 0, total


def test_tiles_of_large_photos_are_batched(model) -> None:
    """Bounded memory for any size: tiles are pieces like photos, batched with padding."""
    rgb = _smooth_image(300, 260, 9)  # network input 288 x 256: 2 tiles of unequal size
    limit, margin = 256 * 256, 96
    assert len(plan_tiles(288, 256, limit, margin)) == 2
    engine = _engine(model, precision="fp32", max_tile_pixels=limit, tile_margin=margin, max_batch_pixels=4 * limit)
    prepared = engine.prepare(rgb)
    assert len(prepared.pieces) == 2 and len(engine.plan_batches(prepared.pieces)) == 1
    locator = LSCCNNLocator.from_model(model, device="cpu", max_tile_pixels=limit, tile_margin=margin)
    total = agreement(locator.locate(rgb), engine.detect([rgb])[0], rgb.shape[:2])
    assert total.reference > 100 and total.identical_fraction >= 0.99 and total.uncovered == 0, total


def test_decoding_overlaps_the_next_forward_pass(model, photos, references, monkeypatch) -> None:
    engine = _engine(model, precision="bf16", max_batch=2, cpu_threads=2)
    finish = engine.finish

    def slow_finish(prepared):  # type: ignore[no-untyped-def]
        time.sleep(0.15)  # a decode long enough to be seen
        return finish(prepared)

    monkeypatch.setattr(engine, "finish", slow_finish)
    trace: list[tuple[str, float, float]] = []
    chosen = photos[:6]
    results = engine.detect(chosen, trace=trace)
    forwards = [(a, b) for stage, a, b in trace if stage == "forward"]
    decodes = [(a, b) for stage, a, b in trace if stage == "decode"]
    assert len(forwards) >= 3 and len(decodes) == len(forwards)
    overlapping = [d for d in decodes if any(a < d[1] and d[0] < b for a, b in forwards)]
    assert overlapping, (forwards, decodes)
    busy = sum(b - a for a, b in forwards) + sum(b - a for a, b in decodes)
    wall = max(b for _, _, b in trace) - min(a for _, a, _ in trace)
    assert wall < busy
    assert _total(references[:6], results, chosen).reference > 0


def test_micro_batcher_shares_batches_between_threads(model, photos, references) -> None:
    engine = _engine(model, precision="fp32", max_batch=4, max_wait_s=0.5)
    sizes: list[int] = []
    batcher = MicroBatcher(engine, on_batch=lambda n, _s: sizes.append(n))
    chosen = photos[:4]
    results: list = [None] * len(chosen)
    start = threading.Barrier(len(chosen))

    def work(k: int) -> None:
        start.wait()
        results[k] = batcher.detect(chosen[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(chosen))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(sizes) == 4 and max(sizes) >= 2, sizes
    total = _total(references[:4], results, chosen)
    assert total.identical_fraction >= 0.99 and total.uncovered == 0, total

    # A failing batch fails its callers (each task applies its own rules); the next one works.
    real = engine.run_batch
    engine.run_batch = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))  # type: ignore[method-assign]
    with pytest.raises(DeviceFailure, match="RuntimeError: device lost"):
        batcher.detect(chosen[0])
    engine.run_batch = real  # type: ignore[method-assign]
    assert len(batcher.detect(chosen[0])) == len(results[0])
    batcher.close()
    with pytest.raises(DeviceFailure, match="closed"):
        batcher.detect(chosen[0])
    other = MicroBatcher(engine)
    with pytest.raises(ValueError):  # not the device's fault: the caller's
        other.detect(np.zeros((8, 8), np.uint8))
    other.close()


def test_compiled_engine_with_stable_shapes(model, photos, references) -> None:
    """torch.compile traces the masking hooks; ``aot_eager`` keeps the test fast on CPU (the
    inductor backend gives the same boxes but takes over a minute to compile here)."""
    engine = _engine(model, precision="fp32", compile=True, compile_backend="aot_eager")
    assert engine.options.shape_stable
    chosen, refs = photos[:4], references[:4]
    batches = engine.plan_batches([p for rgb in chosen for p in engine.prepare(rgb).pieces])
    assert all(hb % 64 == 0 and wb % 64 == 0 for _, hb, wb in batches)
    total = _total(refs, engine.detect(chosen), chosen)
    assert total.identical_fraction >= 0.99 and total.uncovered == 0, total


def test_compiled_engine_compiles_every_bucket(model) -> None:
    """Dynamo gives up on a function after 8 graphs by default and runs the rest eager, without
    a word; a worker sees more bucket shapes than that."""
    compiled: list[tuple[int, ...]] = []

    def counting(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        compiled.append(tuple(inputs[0].shape))
        return graph.forward

    torch._dynamo.reset()
    torch._dynamo.register_backend(counting, name="ppb_counting")
    engine = _engine(model, precision="fp32", compile=True, compile_backend="ppb_counting", max_batch=1)
    widths = [64 * k for k in range(1, 10)]  # 9 buckets, one more than Dynamo's default
    rng = np.random.default_rng(0)
    engine.detect([rng.integers(0, 255, (64, w, 3), dtype=np.uint8) for w in widths])
    assert sorted(shape[-1] for shape in compiled) == widths, compiled
    # The second, process-wide count (256 by default) is raised too: checked on the setting,
    # since hundreds of graphs would take minutes to trace here.
    assert torch._dynamo.config.accumulated_recompile_limit >= 512


def test_fp16_overflow_rerun_waits_no_longer_than_the_deadline() -> None:
    """The float32 rerun runs in the caller's thread: a busy device must not hold it past the
    caller's deadline."""
    torch.manual_seed(3)
    net = he_init(LSCCNN()).eval()
    with torch.no_grad():
        net.conv1_1.weight.mul_(1e4)
    engine = _engine(net, precision="fp16")
    piece = engine.prepare(_smooth_image(32, 48, 7)).pieces[0]
    batch = engine.run_batch([piece], piece.h, piece.w)
    with engine._device_lock:  # another batch holds the device
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            batch.logits(0, deadline=started + 0.3)
        assert time.monotonic() - started < 5.0
    assert engine.overflows == 1
    assert all(np.isfinite(o).all() for o in batch.logits(0, deadline=time.monotonic() + 60))


def test_flops_per_photo_from_the_spec_table() -> None:
    # Spec §1.3: about 359 GMAC at 640x480 and 918 GMAC at 1024x768; issue: ~4.9 TFLOP at 1920x1088.
    assert lsccnn_flops(480, 640) / 2e9 == pytest.approx(359, rel=0.002)
    assert lsccnn_flops(768, 1024) / 2e9 == pytest.approx(918, rel=0.002)
    assert lsccnn_flops(1088, 1920) / 1e12 == pytest.approx(4.88, rel=0.01)
    # ...and the same count measured from the real module shapes (meta tensors, no arithmetic).
    with torch.device("meta"):
        net = LSCCNN()
    macs = []

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        k = module.kernel_size[0] * module.kernel_size[1]
        pixels = inputs[0].shape[-2] * inputs[0].shape[-1] if isinstance(module, nn.ConvTranspose2d) else output.shape[-2] * output.shape[-1]
        macs.append(k * module.in_channels * module.out_channels * pixels)

    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(count)
    net(torch.empty(1, 3, 1088, 1920, device="meta"))
    assert 2 * sum(macs) == lsccnn_flops(1088, 1920)


def test_repeating_shapes_pad_counts_and_sides_to_a_few_values(model) -> None:
    from anonymiser.batching.engine import _slot_count

    assert [_slot_count(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    engine = _engine(model, shape_stable=True, max_batch=8, bucket_multiple=64)
    sizes = [(40, 50), (60, 40), (30, 20), (33, 60), (20, 20)]  # network sides at most 48
    pieces = [engine.prepare(_smooth_image(h, w, 0)).pieces[0] for h, w in sizes]
    (members, hb, wb), = engine.plan_batches(pieces)
    assert (len(members), hb, wb) == (5, 64, 64)  # the bucket's size, not the largest member's
    batch = engine.run_batch(members, hb, wb)  # 6 slots, one of them padding
    assert batch._outputs[0].shape[0] == 5  # the padding slot never leaves the device stage
    assert not _engine(model).options.shape_stable  # CPU default: pad to the largest member only


def test_options_from_env_list_every_problem() -> None:
    env = {"ANON_LSCCNN_PRECISION": "fp8", "ANON_LSCCNN_MAX_BATCH": "0", "ANON_LSCCNN_BUCKET": "40",
           "ANON_LSCCNN_COMPILE": "maybe", "ANON_LSCCNN_DEVICE": "tpu9"}
    with pytest.raises(ValueError) as raised:
        EngineOptions.from_env(env)
    message = str(raised.value)
    for name in ("ANON_LSCCNN_PRECISION", "ANON_LSCCNN_MAX_BATCH", "ANON_LSCCNN_BUCKET", "ANON_LSCCNN_COMPILE",
                 "ANON_LSCCNN_DEVICE"):
        assert name in message, message
    options = EngineOptions.from_env({"ANON_LSCCNN_MAX_BATCH": "32", "ANON_LSCCNN_BATCH_WAIT_MS": "3",
                                      "ANON_LSCCNN_TILE_MEGAPIXELS": "4", "ANON_LSCCNN_PRECISION": "BF16"})
    assert (options.max_batch, options.max_wait_s, options.max_tile_pixels, options.precision) == (32, 0.003, 4_000_000, "bf16")


def test_settings_the_engine_would_refuse_at_warm_up_are_refused_at_start_or_fitted() -> None:
    """Two settings passed the start-up check and then stopped the worker at its warm-up: a
    compile mode torch does not know (reported as a failing GPU, exit 69, not as a setting to
    correct), and a batch limit alone below the device's default tile (the engine refused its
    own default). The first is refused at start with the modes torch knows; the second shrinks
    the tiles to fit the batch."""
    with pytest.raises(ValueError, match=r"ANON_LSCCNN_COMPILE_MODE: .*reduce-overhead.*got 'reduce_overhead'"):
        EngineOptions.from_env({"ANON_LSCCNN_COMPILE_MODE": "reduce_overhead"})
    assert EngineOptions.from_env({"ANON_LSCCNN_COMPILE_MODE": "reduce-overhead"}).compile_mode == "reduce-overhead"
    options = EngineOptions.from_env({"ANON_LSCCNN_BATCH_MEGAPIXELS": "0.5", "ANON_LSCCNN_DEVICE": "cpu"})
    engine = LSCCNNEngine(LSCCNN(), options)  # the CPU's default tile is 1 MP
    assert engine.options.max_tile_pixels == engine.options.max_batch_pixels == 500_000
    with pytest.raises(ValueError, match="ANON_LSCCNN_BATCH_MEGAPIXELS: .*one tile"):
        EngineOptions.from_env({"ANON_LSCCNN_BATCH_MEGAPIXELS": "0.05"})


def test_compiling_without_a_compiler_is_refused_at_start(tmp_path: Path) -> None:
    """``torch.compile`` needs a C compiler for Triton on CUDA and a C++ one on the CPU; a slim
    image has neither, so the start-up check says so instead of the warm-up failing later."""
    bare, tools = tmp_path / "bare", tmp_path / "tools"
    bare.mkdir(), tools.mkdir()
    for name in ("g++", "gcc"):
        (tools / name).write_text("#!/bin/sh\n")
        (tools / name).chmod(0o755)
    on = {"ANON_LSCCNN_COMPILE": "1"}
    with pytest.raises(ValueError, match=r"ANON_LSCCNN_COMPILE: .*a C\+\+ compiler"):
        EngineOptions.from_env(on | {"ANON_LSCCNN_DEVICE": "cpu", "PATH": str(bare)})
    with pytest.raises(ValueError, match=r"ANON_LSCCNN_COMPILE: .*a C compiler"):
        EngineOptions.from_env(on | {"ANON_LSCCNN_DEVICE": "cuda", "PATH": str(bare)})
    assert EngineOptions.from_env(on | {"ANON_LSCCNN_DEVICE": "cpu", "PATH": str(tools)}).compile
    assert EngineOptions.from_env(on | {"ANON_LSCCNN_DEVICE": "cuda", "PATH": str(tools)}).compile
    assert EngineOptions.from_env(on | {"ANON_LSCCNN_DEVICE": "cuda", "PATH": str(bare), "CC": str(tools / "gcc")}).compile
    assert not EngineOptions.from_env({"ANON_LSCCNN_DEVICE": "cpu", "PATH": str(bare)}).compile  # off: nothing needed


def _tf32_switches() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture()
def tf32_allowed() -> Iterator[None]:
    """The switches as cuDNN ships them (TF32 on for convolutions), plus matrix products on."""
    saved = _tf32_switches()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _recording_switches(net: nn.Module) -> list[tuple[bool, bool]]:
    seen: list[tuple[bool, bool]] = []
    net.conv1_1.register_forward_pre_hook(lambda *_: seen.append(_tf32_switches()))
    return seen


def test_fp32_means_ieee_float32_and_tf32_is_asked_for(model, tf32_allowed) -> None:
    """On a GPU, cuDNN runs float32 convolutions in TF32 unless told not to: every forward pass
    states its choice (read here from inside the network) and restores the caller's afterwards."""
    rgb = _smooth_image(32, 48, 5)
    for precision, expected in [("fp32", False), ("tf32", True), ("fp16", False), ("bf16", False)]:
        engine = _engine(model, precision=precision)
        seen = _recording_switches(engine.model)
        engine.detect([rgb])
        assert seen == [(expected, expected)], precision
        assert _tf32_switches() == (True, True), precision
        engine.close()

    net = LSCCNN()
    net.load_state_dict(model.state_dict())
    seen = _recording_switches(net)
    reference_detect(net, rgb)
    LSCCNNLocator.from_model(net, device="cpu").locate(rgb)
    assert seen == [(False, False), (False, False)]
    assert _tf32_switches() == (True, True)


def test_fp16_overflow_rerun_is_ieee_float32(tf32_allowed) -> None:
    torch.manual_seed(3)
    net = he_init(LSCCNN()).eval()
    with torch.no_grad():
        net.conv1_1.weight.mul_(1e4)
    engine = _engine(net, precision="fp16")
    seen = _recording_switches(engine.model)
    engine.detect([_smooth_image(32, 48, 7)])
    assert engine.overflows == 1
    assert seen == [(False, False), (False, False)]


def test_tf32_precision_from_env() -> None:
    assert EngineOptions.from_env({"ANON_LSCCNN_PRECISION": "TF32"}).precision == "tf32"
    with pytest.raises(ValueError, match="ANON_LSCCNN_PRECISION.*fp32, tf32, bf16 or fp16"):
        EngineOptions.from_env({"ANON_LSCCNN_PRECISION": "fp8"})


def _concurrent_detect(batcher: MicroBatcher, images: list[np.ndarray]) -> list:
    """Each photo from its own thread, all at once (as a GPU worker's task threads): detections,
    or the exception that caller got."""
    results: list = [None] * len(images)
    start = threading.Barrier(len(images))

    def work(k: int) -> None:
        start.wait()
        try:
            results[k] = batcher.detect(images[k])
        except Exception as exc:
            results[k] = exc

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_a_failing_batch_fails_only_the_photo_that_fails_alone(model, photos, references) -> None:
    """Batch-mates are other people's jobs: one photo that breaks the network must not take
    them down with it."""
    chosen, refs = photos[:4], references[:4]
    poisoned = chosen[1].shape[:2]
    engine = _engine(model, precision="fp32", max_batch=4, max_wait_s=0.5)
    real = engine.run_batch
    calls: list[tuple[int, bool]] = []

    def run_batch(pieces, hb, wb, precision=None):
        bad = any(p.owner.orig_hw == poisoned for p in pieces)
        calls.append((len(pieces), bad))
        if bad:
            raise ValueError("this photo breaks the network")
        return real(pieces, hb, wb, precision)

    engine.run_batch = run_batch  # type: ignore[method-assign]
    ran: list[int] = []
    batcher = MicroBatcher(engine, on_batch=lambda n, _s: ran.append(n))
    results = _concurrent_detect(batcher, chosen)
    batcher.close()

    assert any(n > 1 and bad for n, bad in calls), f"the poisoned photo never shared a batch: {calls}"
    assert isinstance(results[1], DeviceFailure) and isinstance(results[1].__cause__, ValueError)
    others = [k for k in range(4) if k != 1]
    assert all(not isinstance(results[k], Exception) for k in others), results
    total = _total([refs[k] for k in others], [results[k] for k in others], [chosen[k] for k in others])
    assert total.identical_fraction >= 0.99 and total.uncovered == 0, total
    assert sum(ran) == 3, ran  # every healthy photo ran exactly once, the poisoned one never


OOM_ERRORS = {
    "OutOfMemoryError": lambda: torch.OutOfMemoryError("CUDA out of memory (simulated)"),
    "cudnn workspace": lambda: RuntimeError("GET was unable to find an engine to execute this computation"),
    "cudnn alloc": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    # cuDNN 9's name for it (CUDA 13's torch), as torch words the error
    "cudnn 9 alloc": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
    "cublas alloc": lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
}


def test_only_memory_errors_count_as_out_of_memory() -> None:
    assert all(is_out_of_memory(make()) for make in OOM_ERRORS.values())
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize("oom", list(OOM_ERRORS), ids=list(OOM_ERRORS))
def test_out_of_memory_splits_the_batch_and_shrinks_the_next_ones(model, photos, references, oom) -> None:
    """A batch that does not fit the GPU is run one photo at a time, and later batches are
    planned half as large, so the worker keeps answering instead of failing a batch of jobs.
    cuDNN reports some exhaustion as plain RuntimeErrors; they must shrink the batches too."""
    side = 48
    crops = [np.ascontiguousarray(p[:side, :side]) for p in photos if min(p.shape[:2]) >= side][:4]
    assert len(crops) == 4
    refs = [reference_detect(model, rgb) for rgb in crops]
    engine = _engine(model, precision="fp32", max_batch=4, max_wait_s=0.5, max_batch_pixels=1_000_000)
    fits = 2 * side * side  # this "GPU" holds two of these photos at a time
    real = engine.run_batch
    batches: list[int] = []
    failures: list[int] = []

    def run_batch(pieces, hb, wb, precision=None):
        if len(pieces) * hb * wb > fits:
            failures.append(len(pieces))
            raise OOM_ERRORS[oom]()
        batches.append(len(pieces))
        return real(pieces, hb, wb, precision)

    engine.run_batch = run_batch  # type: ignore[method-assign]
    batcher = MicroBatcher(engine)
    first = _concurrent_detect(batcher, crops)
    assert failures == [4] and batches == [1, 1, 1, 1], (failures, batches)
    assert engine.options.max_batch_pixels == fits
    batches.clear()
    second = _concurrent_detect(batcher, crops)
    batcher.close()
    assert failures == [4], "the next batches must fit"
    assert max(batches) == 2 and sum(batches) == 4, batches  # still batched, at the size that fits
    for results in (first, second):
        assert not any(isinstance(r, Exception) for r in results), results
        total = _total(refs, results, crops)
        assert total.identical_fraction >= 0.99 and total.uncovered == 0, total


def _crops(photos: list[np.ndarray], side: int, count: int) -> list[np.ndarray]:
    crops = [np.ascontiguousarray(p[:side, :side]) for p in photos if min(p.shape[:2]) >= side][:count]
    assert len(crops) == count
    return crops


def test_out_of_memory_frees_the_failed_batch_before_the_photos_run_alone(model, photos) -> None:
    """The error of a failed forward pass holds its frames, and they hold the activations that
    ran out of memory: the photos must not be run again one by one next to those."""
    engine = _engine(model, precision="fp32", max_batch=4)
    net = engine.model
    failed_inputs: list[weakref.ref] = []
    alive_during_reruns: list[bool] = []

    def watch_input(_module, inputs):
        if inputs[0].shape[0] > 1:
            failed_inputs.append(weakref.ref(inputs[0]))
        else:
            alive_during_reruns.append(any(ref() is not None for ref in failed_inputs))

    def out_of_memory(_module, _inputs, output):
        if output.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hooks = [net.conv1_1.register_forward_pre_hook(watch_input), net.conv_scale1_2.register_forward_hook(out_of_memory)]
    pieces = [p for rgb in _crops(photos, 48, 4) for p in engine.prepare(rgb).pieces]
    (members, hb, wb), = engine.plan_batches(pieces)
    outcomes = engine.run_isolating(members, hb, wb)
    for hook in hooks:
        hook.remove()
    assert len(failed_inputs) == 1 and [len(ran) for ran, _ in outcomes] == [1, 1, 1, 1]
    assert not any(isinstance(outcome, Exception) for _, outcome in outcomes)
    assert alive_during_reruns == [False] * 4


def test_one_out_of_memory_round_halves_the_limit_once(model) -> None:
    """Batches planned in the same round as a failed one were planned under the old limit: their
    own failures must not halve the limit again and again (batching would end for good)."""
    side = 144  # four of them make the smallest batch limit a 128 px tile margin allows
    engine = _engine(model, precision="fp32", max_batch=4, bucket_multiple=16,
                     max_tile_pixels=4 * side * side, max_batch_pixels=4 * side * side)
    real = engine.run_batch
    sizes: list[int] = []

    def run_batch(pieces, hb, wb, precision=None):
        sizes.append(len(pieces))
        if len(pieces) * hb * wb > 3 * side * side:  # this "GPU" holds three of these photos
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(pieces, hb, wb, precision)

    engine.run_batch = run_batch  # type: ignore[method-assign]
    src = max(_sources(), key=lambda a: min(a.shape[:2]))
    corners = [(y, x) for y in range(0, src.shape[0] - side + 1, side) for x in range(0, src.shape[1] - side + 1, side)]
    crops = [np.ascontiguousarray(src[y : y + side, x : x + side]) for y, x in corners[:8]]
    assert len(crops) == 8
    pieces = [p for rgb in crops for p in engine.prepare(rgb).pieces]
    planned = engine.plan_batches(pieces)
    assert [len(members) for members, _, _ in planned] == [4, 4]
    for members, hb, wb in planned:  # one round: both planned before either ran
        assert not any(isinstance(o, Exception) for _, o in engine.run_isolating(members, hb, wb))
    assert engine.options.max_batch_pixels == 2 * side * side, "halved once, from the size that failed"
    assert sizes.count(4) == 2


def test_a_limit_shrunk_by_out_of_memory_grows_back_after_good_batches(model, monkeypatch) -> None:
    """Out-of-memory can be passing (another process held the GPU's memory): after a streak of
    good batches the limit doubles back, never past the configured one, and each shrinking
    doubles the streak needed, so a GPU that really is too small settles."""
    from anonymiser.batching import engine as batching_engine

    monkeypatch.setattr(batching_engine, "REGROW_AFTER_BATCHES", 2)
    side = 144  # four of them make the smallest batch limit a 128 px tile margin allows
    engine = _engine(model, precision="fp32", max_batch=4, bucket_multiple=16, shape_stable=False,
                     max_tile_pixels=4 * side * side, max_batch_pixels=4 * side * side)
    src = max(_sources(), key=lambda a: min(a.shape[:2]))
    pieces = [p for x in (0, side, 2 * side, 3 * side) for p in engine.prepare(np.ascontiguousarray(src[:side, x : x + side])).pieces]
    assert len(pieces) == 4
    free = {"pixels": 2 * side * side}  # what the "GPU" holds now

    def run_batch(batch, hb, wb, precision=None):
        if len(batch) * hb * wb > free["pixels"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return "ran"

    engine.run_batch = run_batch  # type: ignore[method-assign]
    limit = lambda: engine.options.max_batch_pixels  # noqa: E731
    engine.run_isolating(pieces, side, side)
    assert limit() == 2 * side * side
    free["pixels"] = 4 * side * side  # the other process let go
    engine.run_isolating(pieces[:2], side, side)
    assert limit() == 2 * side * side, "one good batch is not a streak of 2"
    engine.run_isolating(pieces[:2], side, side)
    assert limit() == 4 * side * side, "doubled back to the configured limit"
    for _ in range(10):
        engine.run_isolating(pieces, side, side)
    assert limit() == 4 * side * side, "never past the configured limit"
    free["pixels"] = 2 * side * side  # and it comes back: halved again, and now 4 good batches needed
    engine.run_isolating(pieces, side, side)
    assert limit() == 2 * side * side
    for _ in range(3):
        engine.run_isolating(pieces[:2], side, side)
    assert limit() == 2 * side * side
    free["pixels"] = 4 * side * side
    engine.run_isolating(pieces[:2], side, side)
    assert limit() == 4 * side * side


def test_a_stalled_device_fails_its_callers_within_the_timeout(model, photos) -> None:
    """A hung GPU must not hold a worker's task threads for ever (Celery's thread pool enforces
    no time limit): each caller gets a DeviceFailure once ``timeout_s`` has passed."""
    engine = _engine(model, precision="fp32", timeout_s=1.0)
    release = threading.Event()
    real = engine.run_batch

    def hung(pieces, hb, wb, precision=None):
        release.wait(30)
        return real(pieces, hb, wb, precision)

    engine.run_batch = hung  # type: ignore[method-assign]
    batcher = MicroBatcher(engine)
    started = time.monotonic()
    results = _concurrent_detect(batcher, _crops(photos, 48, 3))
    waited = time.monotonic() - started
    release.set()
    batcher.close()
    assert all(isinstance(r, DeviceFailure) and isinstance(r.__cause__, TimeoutError) for r in results), results
    assert 1.0 <= waited < 10.0, waited


def test_a_copy_that_never_completes_times_out(model, photos) -> None:
    """On CUDA the logits arrive behind an event; a device that never reaches it must time out."""

    class NeverDone:
        def query(self) -> bool:
            return False

        def synchronize(self) -> None:
            raise AssertionError("would block for ever")

    engine = _engine(model, precision="fp32")
    piece = engine.prepare(_crops(photos, 48, 1)[0]).pieces[0]
    batch = engine.run_batch([piece], piece.h, piece.w)
    batch._event = NeverDone()  # what run_batch records on CUDA
    ready: list[float] = []
    batch.on_ready = ready.append
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        batch.logits(0, deadline=started + 0.3)
    assert 0.3 <= time.monotonic() - started < 5.0
    assert ready == [], "a batch the device never finished is not a healthy batch"
    batch._event = None
    assert len(batch.logits(0)) == 4 and len(ready) == 1 and batch.logits(0) and len(ready) == 1


def test_a_caller_never_waits_for_a_closed_batcher(model, photos) -> None:
    """A photo queued just as the worker shuts the batcher down gets a DeviceFailure instead of
    waiting for a device thread that is gone."""
    batcher = MicroBatcher(_engine(model, precision="fp32"))
    batcher.close()
    assert not batcher._thread.is_alive()
    batcher._stop.clear()  # the caller checked before close() and queues after it
    results = _concurrent_detect(batcher, _crops(photos, 48, 1))
    assert isinstance(results[0], DeviceFailure) and "closed" in str(results[0]), results


def test_device_timeout_defaults_and_setting() -> None:
    assert EngineOptions.from_env({"ANON_LSCCNN_TIMEOUT_S": "45"}).timeout_s == 45.0
    with pytest.raises(ValueError, match="ANON_LSCCNN_TIMEOUT_S"):
        EngineOptions.from_env({"ANON_LSCCNN_TIMEOUT_S": "-1"})
    engine = LSCCNNEngine(LSCCNN(), EngineOptions(device="cpu"))
    assert engine.options.timeout_s == 0.0  # CPU: large batches legitimately take minutes


@pytest.mark.parametrize("raw", ["inf", "1e10"])
def test_a_timeout_too_long_to_wait_for_is_refused_at_start(raw: str) -> None:
    """Python's locks wait at most ``threading.TIMEOUT_MAX`` (about 292 years): past it (an
    operator writing ``inf`` for "no limit"), every wait raised OverflowError, so every photo
    failed as a device failure, and the warm-up stopped the worker as if its GPU had failed."""
    with pytest.raises(ValueError, match="ANON_LSCCNN_TIMEOUT_S.*0 \\(no limit\\)"):
        EngineOptions.from_env({"ANON_LSCCNN_TIMEOUT_S": raw})
    assert EngineOptions.from_env({"ANON_LSCCNN_TIMEOUT_S": "86400"}).timeout_s == 86400.0


def test_logits_that_arrive_as_a_wait_runs_out_are_taken(model) -> None:
    """A caller polls its piece's future every second; when the device thread answers just as one
    poll runs out, the caller takes the answer instead of failing its photo as a timeout (a
    false device failure: the job handed over, the worker one step nearer leaving rotation)."""
    from concurrent.futures import Future

    class AnsweredAsTheWaitEnds(Future):  # type: ignore[type-arg]
        def result(self, timeout=None):  # type: ignore[no-untyped-def]
            if timeout is not None and not self.done():
                self.set_result(("batch", 0))  # the device thread, between the wait and the check
                raise TimeoutError()
            return super().result(timeout)

    batcher = MicroBatcher(_engine(model, precision="fp32"))
    try:
        assert batcher._result(AnsweredAsTheWaitEnds(), time.monotonic() + 30) == ("batch", 0)
        failed: Future = Future()  # type: ignore[type-arg]
        failed.set_exception(TimeoutError("the piece's own error"))
        with pytest.raises(TimeoutError, match="own error"):
            batcher._result(failed, None)
    finally:
        batcher.close()


def test_float32_logits_that_are_not_finite_are_a_device_failure_not_no_heads() -> None:
    """Only half precision's logits were checked for overflow; float32 (or TF32) logits holding
    NaN decoded as background everywhere: a photo answered with no heads covered. Broken
    weights now fail the photo as a worker fault, so another worker (or an operator) sees it."""
    net = LSCCNN()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.fill_(float("nan"))
    engine = LSCCNNEngine(net, EngineOptions(device="cpu", precision="fp32"))
    with pytest.raises(DeviceFailure, match="not finite"):
        engine.detect([np.zeros((64, 96, 3), np.uint8)])
