"""The real locators on real photos, their weight checks, and the tiling and box arithmetic
they share. Photos come from ANON_EVAL_DIR and are read in place (skipped when absent)."""

from __future__ import annotations

import io
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from anonymiser import regions as reg
from anonymiser.errors import WeightsError
from anonymiser.locators import centerface as centerface_module
from anonymiser.locators import heads as heads_module
from anonymiser.locators.base import Detections, is_greyscale
from anonymiser.locators.centerface import STRIDE, CenterFaceLocator, decode_maps
from anonymiser.locators.heads import HeadsLocator, letterbox
from anonymiser.locators.nms import iou_matrix, nms
from anonymiser.locators.registry import REGISTRY, available_names
from anonymiser.locators.onnx_models import OnnxOptions
from anonymiser.locators.tiling import NetInput, Tile, balanced_tile, suppress_duplicates, planar_float32, run_batched, run_tiled, tile_origins, tile_windows, tiles
from anonymiser.pipeline import Anonymiser, Settings

from imaging import ASTRONAUT_FACE, HEADS_FILE, load_eval, points_in_boxes

#: medium-density photos (20-100 heads) on which both locators cover >= 80 % of the heads
MEDIUM_PHOTOS = ("crowdann_IMG_2", "pcount_train_IMG_6")
#: a street scene where most people walk away from the camera (heads seen from behind)
BACK_VIEW_PHOTO = "pcount_train_IMG_19"
#: annotated heads in BACK_VIEW_PHOTO that are seen from behind (checked by eye)
BACK_VIEW_HEADS = ((146, 124), (320, 144), (882, 190))


@pytest.fixture(scope="module")
def centerface_locator(centerface_available: None) -> CenterFaceLocator:
    return CenterFaceLocator()


@pytest.fixture(scope="module")
def heads_locator(heads_dir: Path) -> HeadsLocator:
    return HeadsLocator(heads_dir / HEADS_FILE)


def coverage(points: np.ndarray, found: Detections, kind: str) -> float:
    """Fraction of annotated head points inside a padded box (as the pipeline pads them)."""
    return float(points_in_boxes(points, reg.pad_boxes(found.boxes, kind)).mean())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- astronaut


def test_centerface_finds_the_astronaut(centerface_locator: CenterFaceLocator, astronaut: np.ndarray) -> None:
    """CenterFace finds exactly the one face, confidently, and its padded box takes in the face."""
    found = centerface_locator.locate(astronaut)
    assert len(found) == 1, found.boxes
    assert found.scores[0] > 0.7
    x1, y1, x2, y2 = found.boxes[0]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    fx1, fy1, fx2, fy2 = ASTRONAUT_FACE
    assert fx1 < cx < fx2 and fy1 < cy < fy2
    padded = reg.pad_boxes(found.boxes, "face")[0]
    assert padded[0] <= fx1 and padded[1] <= fy1 and padded[2] >= fx2 and padded[3] >= fy2


def test_head_model_finds_the_astronaut(heads_locator: HeadsLocator, astronaut: np.ndarray) -> None:
    """The head model returns a head box enclosing the astronaut's face."""
    found = heads_locator.locate(astronaut)
    fx1, fy1, fx2, fy2 = ASTRONAUT_FACE
    enclosing = [b for b in found.boxes if b[0] <= fx1 and b[1] <= fy1 and b[2] >= fx2 and b[3] >= fy2]
    assert enclosing, found.boxes
    assert np.all(found.scores >= heads_locator.threshold)


@pytest.mark.parametrize("top", [0, 200, 388])
def test_a_head_across_a_tile_edge_is_covered_whole(heads_locator: HeadsLocator, astronaut: np.ndarray, top: int) -> None:
    """On a 1400x900 canvas with the astronaut 382 px from the left, one 2x tile cuts her head
    at its edge and scores the cut box above the next tile's whole-head box; keeping only the
    cut box left 5-9 % of her face uncovered. Every face pixel is under the kept boxes now."""
    canvas = np.full((900, 1400, 3), 128, np.uint8)
    canvas[top : top + 512, 382 : 382 + 512] = astronaut
    found = heads_locator.locate(canvas)
    covered = np.zeros(canvas.shape[:2], bool)
    for x1, y1, x2, y2 in found.boxes:
        covered[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))] = True
    fx1, fy1, fx2, fy2 = ASTRONAUT_FACE
    assert covered[top + fy1 : top + fy2, 382 + fx1 : 382 + fx2].all()


def test_centerface_keeps_one_box_per_face_within_a_tile(
    centerface_locator: CenterFaceLocator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A face lights up a cluster of cells in one tile: the best-scoring box stands for it, not
    the cluster's union (growing over the cluster made the astronaut's box 40 % larger), while
    sightings from other tiles and scales do widen it (``suppress_duplicates``)."""
    cluster = Detections([[10, 10, 40, 40], [8, 6, 44, 42], [12, 12, 38, 38]], [0.9, 0.5, 0.4])
    monkeypatch.setattr(centerface_module, "decode_maps", lambda *args: cluster)
    monkeypatch.setattr(centerface_locator, "scales", (1.0,))
    monkeypatch.setattr(centerface_locator, "close_up", False)
    found = centerface_locator.locate(np.full((64, 64, 3), 90, np.uint8))
    np.testing.assert_allclose(found.boxes, [[10, 10, 40, 40]])
    np.testing.assert_allclose(found.scores, [0.9])


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2))


def test_black_and_white_photos_are_recognised(astronaut: np.ndarray) -> None:
    """Equal channels, or nearly equal (a B&W photo saved as a colour JPEG), count as greyscale;
    the colour astronaut and a mostly grey photo with one red sign do not."""
    grey = _grey(astronaut)
    assert is_greyscale(grey)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "JPEG", quality=75, subsampling=2)
    assert is_greyscale(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    assert not is_greyscale(astronaut)
    signed = grey.copy()
    signed[:200, :200] = (220, 30, 30)
    assert not is_greyscale(signed)


@pytest.mark.parametrize("which", ["centerface", "heads"])
def test_black_and_white_photos_use_the_grey_threshold(which: str, astronaut: np.ndarray, centerface_available: None,
                                                       heads_dir: Path) -> None:
    """Both models score heads in B&W photos lower, so those photos get their own threshold (on
    the dev photos turned grey, recall rose from 0.953 to 0.977). With the colour threshold
    above any score, only the grey astronaut's head is found."""
    if which == "centerface":
        locator = CenterFaceLocator(threshold=1.01, grey_threshold=0.2)
    else:
        locator = HeadsLocator(heads_dir / HEADS_FILE, threshold=1.01, grey_threshold=0.25)
    assert len(locator.locate(astronaut)) == 0
    found = locator.locate(_grey(astronaut))
    fx1, fy1, fx2, fy2 = ASTRONAUT_FACE
    centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
    assert np.any((centres[:, 0] > fx1) & (centres[:, 0] < fx2) & (centres[:, 1] > fy1) & (centres[:, 1] < fy2))


def test_locators_find_nothing_on_a_blank_image(centerface_locator: CenterFaceLocator, heads_locator: HeadsLocator) -> None:
    """A flat grey image yields no faces and no heads."""
    blank = np.full((480, 640, 3), 128, np.uint8)
    assert len(centerface_locator.locate(blank)) == 0
    assert len(heads_locator.locate(blank)) == 0


# --------------------------------------------------------------------------- real photos


@pytest.fixture(scope="module")
def photo_detections(
    eval_dir: Path, centerface_locator: CenterFaceLocator, heads_locator: HeadsLocator
) -> dict[str, tuple[np.ndarray, dict, Detections, Detections]]:
    """Each chosen photo with its annotation and both locators' raw detections (run once)."""
    out = {}
    for name in (*MEDIUM_PHOTOS, BACK_VIEW_PHOTO):
        rgb, meta = load_eval(eval_dir, name)
        out[name] = (rgb, meta, centerface_locator.locate(rgb), heads_locator.locate(rgb))
    return out


@pytest.mark.parametrize("name", MEDIUM_PHOTOS)
@pytest.mark.parametrize("locator", ["centerface", "heads"])
def test_locator_covers_most_heads_in_a_medium_crowd(
    photo_detections: dict[str, tuple[np.ndarray, dict, Detections, Detections]], name: str, locator: str
) -> None:
    """On real medium-density photos each locator alone covers >= 80 % of the annotated heads
    (point inside its padded box), with boxes reaching into the image."""
    rgb, meta, faces, heads = photo_detections[name]
    assert meta["density_band"] == "medium" and (meta["width"], meta["height"]) == (rgb.shape[1], rgb.shape[0])
    found, kind = (faces, "face") if locator == "centerface" else (heads, "head")
    points = np.asarray(meta["heads"], np.float64)
    assert coverage(points, found, kind) >= 0.8
    # boxes cut by the frame are kept whole, but every box reaches into the image
    assert np.all((found.boxes[:, 0] < rgb.shape[1]) & (found.boxes[:, 2] > 0))
    assert np.all((found.boxes[:, 1] < rgb.shape[0]) & (found.boxes[:, 3] > 0))
    # not "cover everything": boxes are head-sized, not a blanket over the photo
    areas = (found.boxes[:, 2] - found.boxes[:, 0]) * (found.boxes[:, 3] - found.boxes[:, 1])
    assert np.median(areas) < 0.02 * rgb.shape[0] * rgb.shape[1]


@pytest.mark.parametrize("uint8", [False, True], ids=["float-planes", "uint8-bytes"])
@pytest.mark.parametrize("locator", ["centerface", "heads"])
def test_batched_tiles_give_the_same_detections(
    photo_detections: dict[str, tuple[np.ndarray, dict, Detections, Detections]],
    heads_dir: Path,
    locator: str,
    uint8: bool,
) -> None:
    """Tiles run three at a time (as on the GPU, where the default is 8) give the same boxes and
    scores as one tile per call, on real photos, also when the graph takes the tiles' bytes and
    upscales them (as on the GPU); and the calls really are batched, and with bytes the 2x
    tiles really reach the graph at the photo's scale."""
    options = OnnxOptions(threads=0, tile_batch=3, uint8_input=int(uint8))
    batched = (CenterFaceLocator(onnx_options=options) if locator == "centerface"
               else HeadsLocator(heads_dir / HEADS_FILE, onnx_options=options))
    assert batched.tile_batch == 3
    sizes: list[int] = []
    upscales: set[int] = set()
    infer = batched._infer

    def counting(batch: NetInput) -> list:
        sizes.append(len(batch.pixels))
        upscales.add(batch.upscale)
        return infer(batch)

    batched._infer = counting  # type: ignore[method-assign]
    for name, (rgb, _meta, faces, heads) in photo_detections.items():
        alone = faces if locator == "centerface" else heads
        together = batched.locate(rgb)
        assert len(together) == len(alone), name
        order_a, order_t = np.lexsort(alone.boxes.T), np.lexsort(together.boxes.T)
        np.testing.assert_allclose(together.boxes[order_t], alone.boxes[order_a], atol=1e-3)
        np.testing.assert_allclose(together.scores[order_t], alone.scores[order_a], atol=1e-5)
    assert max(sizes) == 3 and sum(sizes) > len(sizes)
    assert upscales == ({1, 2} if uint8 else {1})


#: a parade seen from far: most annotated faces are 5-13 px across
TINY_FACES_PHOTO = "wider_0_Parade_Parade_0_164"


def test_the_close_up_pass_finds_tiny_faces_the_other_passes_miss(
    eval_dir: Path, centerface_available: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the 1x and 2x passes find a crowd of faces under 10 px, the windows holding them are
    looked at again at 4x: on a far-off parade the faces covered go from 61 % to 80 % (the
    test asks under 65 % and over 75 %), and only part of the photo, within the budget, is
    looked at again."""
    rgb, meta = load_eval(eval_dir, TINY_FACES_PHOTO)
    points = np.asarray(meta["heads"], np.float64)
    options = OnnxOptions(threads=0, tile_batch=1, uint8_input=0)
    plain = CenterFaceLocator(close_up=False, onnx_options=options)
    closer = CenterFaceLocator(onnx_options=options)
    chosen: list[list[tuple[int, int, int, int]]] = []
    pick = centerface_module.crowded_windows

    def recording(*args: object) -> list[tuple[int, int, int, int]]:
        chosen.append(pick(*args))  # type: ignore[arg-type]
        return chosen[-1]

    monkeypatch.setattr(centerface_module, "crowded_windows", recording)
    calls = 0
    infer = closer._infer

    def counting(batch: NetInput) -> list:
        nonlocal calls
        calls += 1
        return infer(batch)

    closer._infer = counting  # type: ignore[method-assign]
    before, after = plain.locate(rgb), closer.locate(rgb)
    assert coverage(points, before, "face") < 0.65 < 0.75 < coverage(points, after, "face")
    # every face the plain passes found is still covered, as the pipeline pads face boxes (NMS
    # may keep an overlapping close-up box instead)
    assert points_in_boxes((before.boxes[:, :2] + before.boxes[:, 2:]) / 2, reg.pad_boxes(after.boxes, "face")).all()
    [windows] = chosen
    h, w = rgb.shape[:2]
    area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in windows)
    assert 0 < area <= centerface_module.CLOSE_UP_SHARE * w * h
    assert calls == sum(1 for f in plain.scales for _ in plain._tiles(rgb, f)) + len(windows)


def test_the_close_up_pass_on_bytes_matches_the_host(eval_dir: Path, centerface_available: None) -> None:
    """On a GPU worker the graph upscales the close-up's tiles 4x itself: the same boxes and
    scores as the host's upscale."""
    rgb, _meta = load_eval(eval_dir, TINY_FACES_PHOTO)
    on_bytes = CenterFaceLocator(onnx_options=OnnxOptions(threads=0, tile_batch=2, uint8_input=1))
    upscales: set[int] = set()
    infer = on_bytes._infer

    def recording(batch: NetInput) -> list:
        upscales.add(batch.upscale)
        return infer(batch)

    on_bytes._infer = recording  # type: ignore[method-assign]
    found = on_bytes.locate(rgb)
    expected = CenterFaceLocator(onnx_options=OnnxOptions(threads=0, tile_batch=1, uint8_input=0)).locate(rgb)
    assert upscales == {1, 2, centerface_module.CLOSE_UP_FACTOR}
    np.testing.assert_array_equal(found.boxes, expected.boxes)
    np.testing.assert_array_equal(found.scores, expected.scores)


def test_crowded_windows_pick_the_most_crowded_within_the_budget() -> None:
    windows = [(0, 0, 10, 10), (10, 0, 20, 10), (20, 0, 40, 10), (40, 0, 50, 10)]
    centres = np.array([[1, 1], [2, 2], [3, 3],  # 3 in the first
                        [11, 1], [12, 2],  # 2 in the second
                        [21, 1], [22, 1], [23, 1], [24, 1],  # 4 in the third (twice the area)
                        [55, 5]], np.float64)  # outside every window
    pick = centerface_module.crowded_windows
    assert pick(windows, centres, 2, 1e9) == windows[:3]  # in the given order
    assert pick(windows, centres, 3, 1e9) == [windows[0], windows[2]]
    # the most crowded first: the third (area 200) takes the budget, the first no longer fits
    assert pick(windows, centres, 2, 250) == [windows[2]]
    # a window that does not fit is passed over for a smaller one that does
    assert pick(windows, centres, 2, 300) == [windows[0], windows[2]]
    assert pick(windows, centres, 5, 1e9) == []
    assert pick(windows, np.zeros((0, 2)), 1, 1e9) == []
    with pytest.raises(ValueError):
        pick(windows, centres, 0, 1e9)


def test_tiles_cut_only_the_selected_windows() -> None:
    """``select`` sees every window before any is cut or resized, and only its choice is cut."""
    rgb = np.random.default_rng(1).integers(0, 256, (300, 500, 3), np.uint8)
    every = list(tiles(rgb, 2.0, 256, 256, 32))
    seen: list[list[tuple[int, int, int, int]]] = []

    def odd(windows: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        seen.append(list(windows))
        return windows[1::2]

    chosen = list(tiles(rgb, 2.0, 256, 256, 32, select=odd))
    assert len(seen) == 1 and len(seen[0]) == len(every)
    assert [(t.x0, t.y0) for t in chosen] == [(t.x0, t.y0) for t in every[1::2]]
    for mine, theirs in zip(chosen, every[1::2]):
        np.testing.assert_array_equal(mine.image, theirs.image)


def test_run_batched_groups_equal_shapes_only() -> None:
    """Inputs of different shapes, or that the graph would upscale or pad differently, never
    share a batch (nothing is padded), no batch exceeds the limit, and every input's output
    reaches its own finisher."""
    shapes = [(3, 32, 64), (3, 64, 32), (3, 32, 64), (3, 32, 64), (3, 64, 32), (3, 32, 64), (3, 32, 64)]
    graph_steps = [(1, (0, 0))] * len(shapes) + [(2, (0, 0)), (2, (0, 0)), (2, (4, 0))]
    shapes += [(3, 32, 64)] * 3
    jobs = []
    for index, (shape, (upscale, pad)) in enumerate(zip(shapes, graph_steps)):
        blob = np.full(shape, index, np.float32)
        jobs.append((NetInput(blob, upscale, pad), lambda value, i=index: Detections([[i, i, i + 1, i + 1]], [value])))
    calls: list[tuple[tuple[int, ...], int, tuple[int, int]]] = []

    def infer(batch: NetInput) -> list[float]:
        calls.append((batch.pixels.shape, batch.upscale, batch.pad))
        return [float(item.flat[0]) for item in batch.pixels]  # each input's own marker

    found = run_batched(iter(jobs), infer, batch=3)
    assert sorted(found.scores.tolist()) == list(range(len(shapes)))
    np.testing.assert_array_equal(found.boxes[:, 0], found.scores)  # output i went to finisher i
    assert all(shape[0] <= 3 for shape, _, _ in calls)
    assert sorted(calls) == sorted([
        ((3, 3, 32, 64), 1, (0, 0)), ((2, 3, 32, 64), 1, (0, 0)), ((2, 3, 64, 32), 1, (0, 0)),
        ((2, 3, 32, 64), 2, (0, 0)), ((1, 3, 32, 64), 2, (4, 0)),
    ])
    with pytest.raises(ValueError):
        run_batched(iter(jobs), infer, batch=0)


def test_tiles_map_back_like_run_tiled() -> None:
    """``tiles`` and ``Tile.to_source`` are what ``run_tiled`` is made of: a whole-image tile
    maps boxes unchanged, and tile images are the resized windows."""
    image = np.random.default_rng(3).integers(0, 255, (500, 900, 3), np.uint8)
    whole = Tile(image, 0, 0, 1.0, 1.0)
    box = Detections([[1, 2, 3, 4]], [0.5])
    np.testing.assert_array_equal(whole.to_source(box).boxes, box.boxes)
    cut = list(tiles(image, 2.0, 640, 480, 160))
    assert all(t.image.shape == (480, 640, 3) for t in cut)
    assert len(cut) == len(tile_windows(900, 500, 320, 240, 80))


@pytest.mark.filterwarnings("ignore:Specified provider")  # the CPU build's own complaint
def test_a_cuda_provider_that_does_not_start_is_reported(
    centerface_available: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, astronaut: np.ndarray
) -> None:
    """ONNX Runtime quietly runs on the CPU when its CUDA provider cannot start (missing or
    mismatched CUDA libraries); the locator still works and a warning says what happened."""
    from anonymiser.locators import onnx_models

    monkeypatch.setattr(onnx_models, "providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level("WARNING", logger=onnx_models.__name__):
        locator = CenterFaceLocator(onnx_options=OnnxOptions())
    assert locator._session.get_providers() == ["CPUExecutionProvider"]
    assert locator.tile_batch == 1  # by the provider it got, not the one it asked for
    assert locator._session.uint8_input  # the graph was made for the GPU, and runs as well on the CPU
    assert len(locator.locate(astronaut)) > 0
    assert [r.getMessage() for r in caplog.records] == ["onnx_cuda_unavailable"]


def test_gpu_sessions_do_not_leave_cpu_threads_spinning() -> None:
    """A GPU worker's cores belong to its decoding and encoding threads: the CPU pool of a CUDA
    session sleeps between runs; a CPU session keeps ONNX Runtime's spinning (it is the work)."""
    from anonymiser.locators.onnx_models import session_options

    gpu = session_options(OnnxOptions(threads=3), cuda=True)
    assert gpu.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert gpu.intra_op_num_threads == 3
    cpu = session_options(OnnxOptions(), cuda=False)
    with pytest.raises(RuntimeError, match="does not have configuration"):
        cpu.get_session_config_entry("session.intra_op.allow_spinning")


def test_onnx_options_from_env() -> None:
    """``ANON_ONNX_*`` are read and checked; CPU sessions default to one tile per call, CUDA
    sessions to four calls at once and no arena cap."""
    assert OnnxOptions.from_env({}) == OnnxOptions(0, None, 4, None, None)
    assert OnnxOptions.from_env({"ANON_ONNX_THREADS": "2", "ANON_ONNX_TILE_BATCH": "16", "ANON_ONNX_GPU_RUNS": "2",
                                 "ANON_ONNX_GPU_MEMORY_MB": "4096", "ANON_ONNX_UINT8_INPUT": "0"}) == OnnxOptions(2, 16, 2, 4096, 0)
    for env in ({"ANON_ONNX_TILE_BATCH": "0"}, {"ANON_ONNX_TILE_BATCH": "many"}, {"ANON_ONNX_THREADS": "-1"},
                {"ANON_ONNX_GPU_RUNS": "0"}, {"ANON_ONNX_GPU_RUNS": "65"}, {"ANON_ONNX_GPU_MEMORY_MB": "100"},
                {"ANON_ONNX_UINT8_INPUT": "2"}):
        with pytest.raises(ValueError, match=next(iter(env))):
            OnnxOptions.from_env(env)
    with pytest.raises(ValueError, match="ANON_ONNX_GPU_RUNS must be between 1 and 64, got 0"):
        OnnxOptions(gpu_runs=0)


@pytest.mark.filterwarnings("ignore:Specified provider")  # the CPU build's own complaint
def test_cuda_sessions_get_the_arena_settings(centerface_available: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CUDA provider is asked for: heuristic cuDNN search, an arena that grows by what
    is asked, and the cap in bytes when ``ANON_ONNX_GPU_MEMORY_MB`` sets one."""
    from anonymiser.locators import onnx_models

    asked: list[object] = []
    real = onnx_models.ort.InferenceSession

    def recording(model: bytes, sess_options: object, providers: list[object]) -> object:
        asked.append(providers)
        return real(model, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(onnx_models, "providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnx_models.ort, "InferenceSession", recording)
    CenterFaceLocator(onnx_options=OnnxOptions(gpu_memory_mb=3000))
    CenterFaceLocator(onnx_options=OnnxOptions())
    expected = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
    assert asked == [[("CUDAExecutionProvider", {**expected, "gpu_mem_limit": str(3000 * 1024 * 1024)}), "CPUExecutionProvider"],
                     [("CUDAExecutionProvider", expected), "CPUExecutionProvider"]]


class _CountingSession:
    """Stands for an ONNX Runtime session: counts the calls running at once."""

    def __init__(self, provider: str, barrier: threading.Barrier | None = None) -> None:
        self.provider = provider
        self.barrier = barrier
        self.running = self.most = 0
        self.lock = threading.Lock()

    def get_providers(self) -> list[str]:
        return [self.provider, "CPUExecutionProvider"]

    def run(self, names: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        if self.barrier is not None:
            self.barrier.wait(timeout=10)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return [feeds["x"] * 2]


def _call_from_threads(session: object, threads: int) -> list[np.ndarray]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda k: session.run(None, {"x": np.full(1, k)})[0], range(threads)))  # type: ignore[attr-defined]


def test_cuda_session_runs_a_bounded_number_of_calls_at_once() -> None:
    """Twelve task threads share one CUDA session: at most ``gpu_runs`` calls hold activations
    in its arena at once, and every caller still gets its own answer."""
    from anonymiser.locators.onnx_models import Session

    inner = _CountingSession("CUDAExecutionProvider")
    outputs = _call_from_threads(Session(inner, gpu_runs=3), 12)
    assert inner.most == 3
    assert [int(o[0]) for o in outputs] == [2 * k for k in range(12)]


def test_cpu_session_calls_are_not_gated() -> None:
    """On the CPU nothing waits: six calls meet inside the session at once (a gate of one would
    leave the first at the barrier until it timed out)."""
    from anonymiser.locators.onnx_models import Session

    inner = _CountingSession("CPUExecutionProvider", threading.Barrier(6))
    _call_from_threads(Session(inner, gpu_runs=1), 6)
    assert inner.most == 6


def test_head_model_finds_heads_seen_from_behind(
    photo_detections: dict[str, tuple[np.ndarray, dict, Detections, Detections]],
) -> None:
    """In a street scene of people walking away, the head model covers the backs of heads the
    face detector cannot see (which is why it exists), and >= 80 % of all heads."""
    rgb, meta, faces, heads = photo_detections[BACK_VIEW_PHOTO]
    points = np.asarray(meta["heads"], np.float64)
    back = np.asarray(
        [points[np.argmin(np.hypot(*(points - p).T))] for p in BACK_VIEW_HEADS], np.float64
    )
    assert np.all(np.hypot(*(back - np.asarray(BACK_VIEW_HEADS)).T) < 10)  # annotation as expected
    assert points_in_boxes(back, reg.pad_boxes(heads.boxes, "head")).all()
    assert coverage(points, heads, "head") >= 0.8
    # the precondition that makes this photo a back-view test: faces are mostly not visible
    assert not points_in_boxes(back, reg.pad_boxes(faces.boxes, "face")).any()
    assert coverage(points, faces, "face") < 0.5


# --------------------------------------------------------------------------- weights


def _copy_model(heads_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / HEADS_FILE
    shutil.copyfile(heads_dir / HEADS_FILE, target)
    return target


def test_intact_head_model_verifies(heads_dir: Path) -> None:
    """The shipped file has the expected size and checksum."""
    heads_module.verify_file(heads_dir / HEADS_FILE)
    assert (heads_dir / HEADS_FILE).stat().st_size == heads_module.SIZE


def test_head_model_with_one_byte_changed_is_refused(heads_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy with one flipped byte (right size, wrong sha256) raises WeightsError before ONNX
    even parses it, through the locator, the registry and the Anonymiser."""
    path = _copy_model(heads_dir, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("onnx.load was called on an unverified file")

    monkeypatch.setattr(heads_module.onnx, "load", no_parse)
    with pytest.raises(WeightsError, match="sha256") as caught:
        HeadsLocator(path)
    assert caught.value.code == "weights_error"
    with pytest.raises(WeightsError, match="sha256"):
        REGISTRY["heads"].load(tmp_path)
    with pytest.raises(WeightsError):
        Anonymiser(Settings(locators=("heads",), residual_pass=False), weights_dir=tmp_path)


def test_truncated_head_model_is_refused(heads_dir: Path, tmp_path: Path) -> None:
    """A truncated copy raises WeightsError naming the size mismatch."""
    path = _copy_model(heads_dir, tmp_path)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(WeightsError, match="bytes"):
        HeadsLocator(path)


def test_missing_head_model_is_refused_and_not_listed(tmp_path: Path) -> None:
    """No file: WeightsError from the locator, and the registry does not list 'heads'."""
    with pytest.raises(WeightsError, match="not found"):
        HeadsLocator(tmp_path / HEADS_FILE)
    assert "heads" not in available_names(tmp_path)


def test_registry_lists_installed_locators(heads_dir: Path) -> None:
    """With the head model installed, the registry offers it (after CenterFace when present)."""
    names = available_names(heads_dir)
    assert "heads" in names
    assert list(REGISTRY)[:2] == ["centerface", "heads"]


# --------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("length", [1, 100, 640, 641, 1000, 1023, 3000, 4111])
@pytest.mark.parametrize("tile,overlap", [(640, 160), (480, 160), (1024, 192), (320, 0), (33, 32)])
def test_tile_origins_cover_with_overlap(length: int, tile: int, overlap: int) -> None:
    """Tiles start at 0, end flush with the image, cover every pixel and overlap by at least
    the requested amount."""
    origins = tile_origins(length, tile, overlap)
    assert origins[0] == 0
    if length <= tile:
        assert origins == [0]
        return
    assert origins[-1] + tile == length
    assert all(b > a for a, b in zip(origins, origins[1:]))
    assert all(a + tile - b >= overlap for a, b in zip(origins, origins[1:]))
    covered = np.zeros(length, bool)
    for start in origins:
        covered[start : start + tile] = True
    assert covered.all()


def test_tile_origins_refuse_overlap_as_big_as_the_tile() -> None:
    """An overlap not smaller than the tile is an error (it would never advance)."""
    with pytest.raises(ValueError):
        tile_origins(1000, 100, 100)


@pytest.mark.parametrize("width,height", [(640, 480), (1000, 700), (4032, 3024), (300, 2000)])
def test_tile_windows_cover_the_image(width: int, height: int) -> None:
    """Windows are clipped to the image, at most tile-sized, and together cover every pixel
    with the requested overlap between neighbours."""
    windows = tile_windows(width, height, 640, 480, 160)
    covered = np.zeros((height, width), np.int32)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 <= 640 and y1 - y0 <= 480
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    xs = sorted({w[0] for w in windows})
    ys = sorted({w[1] for w in windows})
    assert all(a + 640 - b >= 160 for a, b in zip(xs, xs[1:]))
    assert all(a + 480 - b >= 160 for a, b in zip(ys, ys[1:]))


def _padded_area(windows: list[tuple[int, int, int, int]], align: int = 32) -> int:
    return sum(-(-(x1 - x0) // align) * align * -(-(y1 - y0) // align) * align for x0, y0, x1, y1 in windows)


@pytest.mark.parametrize("width,height", [(1, 1), (640, 480), (1154, 865), (1184, 896), (1920, 1088), (1080, 1350),
                                          (3840, 2176), (8000, 6000), (100, 5000), (5000, 100), (33, 10000)])
def test_balanced_tiles_cover_within_the_bound_with_less_work(width: int, height: int) -> None:
    """Balanced tiles cover every pixel with the overlap, each padded tile stays within the
    pixel bound, all of an image's tiles pad to one shape (so they batch), and the network
    input is never more than fixed 1024x1024 tiles at the same overlap give, and much less on
    ordinary photos."""
    bound, overlap = centerface_module.MAX_TILE_PIXELS, centerface_module.OVERLAP
    tile_w, tile_h = balanced_tile(width, height, overlap, bound)
    windows = tile_windows(width, height, tile_w, tile_h, overlap)
    covered = np.zeros((height, width), np.int32)
    for x0, y0, x1, y1 in windows:
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert {(-(-(x1 - x0) // 32), -(-(y1 - y0) // 32)) for x0, y0, x1, y1 in windows} == {(-(-tile_w // 32), -(-tile_h // 32))}
    assert _padded_area(windows[:1]) <= bound
    xs, ys = sorted({w[0] for w in windows}), sorted({w[1] for w in windows})
    assert all(a + tile_w - b >= overlap for a, b in zip(xs, xs[1:]))
    assert all(a + tile_h - b >= overlap for a, b in zip(ys, ys[1:]))
    fixed = _padded_area(tile_windows(width, height, 1024, 1024, overlap))
    assert _padded_area(windows) <= fixed
    if (width, height) == (1920, 1088):
        assert (tile_w, tile_h, len(windows)) == (832, 1088, 3)  # six 1024x1024 tiles before
        assert _padded_area(windows) < 0.5 * fixed


@pytest.mark.parametrize("factor", [0.5, 1.0, 4 / 3, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("width,height", [(1, 1), (5, 1), (397, 912), (511, 3000), (1023, 1000), (1920, 1088), (300, 15000)])
def test_centerface_tiles_keep_the_plan_at_any_scale(width: int, height: int, factor: float) -> None:
    """The tiles CenterFace really gets (cut from the source, then resized) cover the photo,
    overlap by at least OVERLAP network pixels, pad to one shape within the pixel bound at any
    scale (rounding the tile to source pixels once made a 2.5x tile pad past the bound), and a
    photo that fits one tile is not cut in two."""
    rgb = np.zeros((height, width, 3), np.uint8)
    cut = list(CenterFaceLocator._tiles(rgb, factor))
    covered = np.zeros((height, width), bool)
    padded = set()
    for tile in cut:
        th, tw = tile.image.shape[:2]
        x1, y1 = tile.x0 + round(tw / tile.sx), tile.y0 + round(th / tile.sy)
        covered[tile.y0 : y1, tile.x0 : x1] = True
        padded.add((-(-th // 32) * 32, -(-tw // 32) * 32))
    assert covered.all()
    assert len(padded) == 1 and all(h * w <= centerface_module.MAX_TILE_PIXELS for h, w in padded)
    for axis in (0, 1):
        starts = sorted({(t.x0, t.y0)[axis] for t in cut})
        side = cut[0].image.shape[1 - axis] / (cut[0].sx, cut[0].sy)[axis]
        assert all((a + side - b) * factor >= centerface_module.OVERLAP - 1e-6 for a, b in zip(starts, starts[1:]))
    net_w, net_h = max(1, round(width * factor)), max(1, round(height * factor))
    if -(-net_w // 32) * 32 * -(-net_h // 32) * 32 <= centerface_module.MAX_TILE_PIXELS:
        assert len(cut) == 1


def test_balanced_tile_refuses_a_bound_no_tile_fits() -> None:
    """A pixel bound too small for any tile wider than the overlap is an error, not a hang."""
    with pytest.raises(ValueError):
        balanced_tile(4000, 3000, 192, 200 * 200)


DOT = 6


def _dotted_image() -> tuple[np.ndarray, np.ndarray]:
    """A black 700x500 image with white 6x6 dots on a grid; returns it and the dot centres."""
    image = np.zeros((500, 700, 3), np.uint8)
    centres = []
    for y in range(20, 500 - DOT, 47):
        for x in range(15, 700 - DOT, 53):
            image[y : y + DOT, x : x + DOT] = 255
            centres.append((x + DOT / 2, y + DOT / 2))
    return image, np.asarray(centres)


class DotDetector:
    """Fake detect function: a box around every whole white blob in the crop, in crop pixels."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, crop: np.ndarray) -> Detections:
        self.shapes.append(crop.shape)
        count, _, stats, _ = cv2.connectedComponentsWithStats((crop[..., 0] > 100).astype(np.uint8))
        h, w = crop.shape[:2]
        boxes = []
        for x, y, bw, bh, _area in stats[1:count]:
            if x > 0 and y > 0 and x + bw < w and y + bh < h:  # whole blobs only
                boxes.append([x, y, x + bw, y + bh])
        return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.ones(len(boxes), np.float32))


@pytest.mark.parametrize("factor", [1.0, 2.0, 0.5])
def test_run_tiled_maps_boxes_back(factor: float) -> None:
    """Boxes found in each scaled tile come back in source pixels: every dot is found, each
    box is centred on a real dot, and tiles never exceed the network size."""
    image, centres = _dotted_image()
    detector = DotDetector()
    found = run_tiled(image, factor, 256, 192, 64, detector)
    assert len(detector.shapes) > 1  # really tiled
    for shape in detector.shapes:
        assert shape[1] <= 256 + 1 and shape[0] <= 192 + 1
    box_centres = np.stack([(found.boxes[:, 0] + found.boxes[:, 2]) / 2, (found.boxes[:, 1] + found.boxes[:, 3]) / 2], axis=1)
    tolerance = 1.0 / factor + 0.6
    nearest = np.min(np.hypot(box_centres[:, None, 0] - centres[None, :, 0], box_centres[:, None, 1] - centres[None, :, 1]), axis=1)
    assert nearest.max() <= tolerance
    found_any = np.min(np.hypot(centres[:, None, 0] - box_centres[None, :, 0], centres[:, None, 1] - box_centres[None, :, 1]), axis=1)
    assert found_any.max() <= tolerance
    sides = found.boxes[:, 2] - found.boxes[:, 0]
    assert np.all(np.abs(sides - DOT) <= 2.0 / factor + 1)


def test_run_tiled_known_box_per_tile() -> None:
    """A detector that always reports the same box in tile pixels gets it back offset by each
    window's origin and divided by the scale."""
    image = np.zeros((600, 900, 3), np.uint8)
    found = run_tiled(image, 2.0, 640, 480, 160, lambda crop: Detections([[10, 20, 30, 40]], [0.9]))
    windows = tile_windows(900, 600, 320, 240, 80)
    expected = np.asarray([[x0 + 5, y0 + 10, x0 + 15, y0 + 20] for x0, y0, _, _ in windows], np.float32)
    np.testing.assert_allclose(np.sort(found.boxes, axis=0), np.sort(expected, axis=0), atol=0.01)


def test_suppress_duplicates_removes_tile_duplicates() -> None:
    """Duplicates from overlapping tiles collapse to the best-scoring one, grown to enclose
    them; a box cut by the frame is kept whole and one wholly outside (tile fill) is dropped."""
    found = Detections(
        [[10, 10, 50, 50], [11, 9, 51, 49], [-20, 90, 30, 130], [60, 20, 90, 50], [101, 5, 130, 40], [5, -30, 25, 0]],
        [0.8, 0.9, 0.7, 0.6, 0.95, 0.95],
    )
    kept = suppress_duplicates(found, 100, 120, 0.45)
    assert len(kept) == 3
    np.testing.assert_allclose(kept.scores, [0.9, 0.7, 0.6])
    np.testing.assert_allclose(kept.boxes[0], [10, 9, 51, 50])
    np.testing.assert_allclose(kept.boxes[1], [-20, 90, 30, 130])
    np.testing.assert_allclose(kept.boxes[2], [60, 20, 90, 50])


def test_a_face_cut_by_the_frame_is_padded_from_its_whole_box() -> None:
    """A face half outside the left edge: padding its whole predicted box covers more of the
    visible hair and ear than padding the clipped part did (which also moved its centre)."""
    face = Detections([[-40, 100, 40, 200]], [0.9])
    kept = suppress_duplicates(face, 640, 480, 0.45)
    whole = reg.to_pixels(reg.pad_boxes(kept.boxes, "face"), 1.0, 640, 480)[0][0]
    clipped = reg.to_pixels(reg.pad_boxes(np.array([[0, 100, 40, 200]], np.float32), "face"), 1.0, 640, 480)[0][0]
    assert whole[2] == 64 and clipped[2] == 52  # right edge: 0 + 1.6 * 80 / 2 against 20 + 1.6 * 40 / 2
    assert whole[0] <= clipped[0] and whole[1] <= clipped[1] and whole[3] >= clipped[3]


def test_a_head_cut_by_a_tile_edge_stays_whole_where_the_cut_box_scores_higher() -> None:
    """On a dev photo the head model scored a head cut by one tile's inner edge (0.93) above the
    same head seen whole by the next tile (0.90); plain NMS kept the cut box and a quarter of
    the head went uncovered. The kept box now takes in the whole sighting."""
    cut, whole = [528, 208, 640, 389], [529, 205, 690, 391]
    kept = suppress_duplicates(Detections([cut, whole], [0.93, 0.90]), 1400, 900, 0.45)
    assert len(kept) == 1
    np.testing.assert_allclose(kept.scores, [0.93])
    np.testing.assert_allclose(kept.boxes[0], [528, 205, 690, 391])


def test_a_box_grows_only_by_the_boxes_it_removed() -> None:
    """Greedy order decides who removes whom: a box removed by a better one never widens a
    third box it also overlaps, and separate heads never merge."""
    boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [8, 0, 18, 10], [100, 100, 110, 110]]
    kept = suppress_duplicates(Detections(boxes, [0.9, 0.8, 0.7, 0.6]), 200, 200, 0.45)
    # box 1 (IoU 0.82 with box 0) is removed by box 0; box 2 overlaps box 1 (IoU 0.18) and
    # box 0 (0.11) too little to go
    np.testing.assert_allclose(kept.boxes, [[0, 0, 11, 10], [8, 0, 18, 10], [100, 100, 110, 110]])


def _greedy_loop(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS as it was written before: keep boxes whose IoU is "<= threshold"."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        keep.append(int(order[0]))
        rest = order[1:]
        order = rest[iou_matrix(boxes[order[:1]], boxes[rest])[0] <= threshold]
    return keep


def test_nms_box_with_nan_coordinates_suppresses_nothing() -> None:
    """A network's output can overflow (CenterFace's sizes are exponentials; inf - inf is NaN):
    such a box must not take every later box with it, as it did when NMS kept "IoU <= threshold"
    (never true for NaN)."""
    boxes = np.array([[np.nan, 0, np.nan, 10], [10, 10, 20, 20], [100, 100, 120, 120]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert _greedy_loop(boxes, scores, 0.3) == [0]
    assert nms(boxes, scores, 0.3).tolist() == [0, 1, 2]


def test_nms_and_iou() -> None:
    """IoU of identical boxes is 1 and of disjoint ones 0; NMS keeps the best of a cluster."""
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(iou_matrix(a, a), np.eye(2))
    np.testing.assert_allclose(iou_matrix(a[:1], np.array([[5, 0, 15, 10]], np.float32)), [[1 / 3]], rtol=1e-5)
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], np.float32)
    assert nms(boxes, np.array([0.5, 0.9, 0.3], np.float32), 0.5).tolist() == [1, 2]


def test_detections_validate_shapes() -> None:
    """Detections insist on one score per box and concatenate correctly."""
    with pytest.raises(ValueError):
        Detections([[0, 0, 1, 1]], [0.5, 0.6])
    both = Detections.concat([Detections([[0, 0, 1, 1]], [0.5]), Detections(), Detections([[2, 2, 3, 3]], [0.1])])
    assert len(both) == 2 and both.boxes.dtype == np.float32
    assert len(Detections.concat([])) == 0


# --------------------------------------------------------------------------- model plumbing


def test_centerface_decode_maps() -> None:
    """A heat-map peak with a log-size of s becomes a box of side exp(s)*stride around the
    offset-corrected cell centre; cells under the threshold are ignored."""
    heat = np.zeros((10, 12), np.float32)
    heat[3, 5] = 0.9
    heat[7, 1] = 0.1
    scale = np.zeros((2, 10, 12), np.float32)
    scale[:, 3, 5] = np.log(8.0)  # 8 cells * stride 4 = 32 px
    offset = np.zeros((2, 10, 12), np.float32)
    offset[:, 3, 5] = 0.25
    found = decode_maps(heat, scale, offset, threshold=0.2)
    assert len(found) == 1
    cx, cy = (5 + 0.25 + 0.5) * STRIDE, (3 + 0.25 + 0.5) * STRIDE
    np.testing.assert_allclose(found.boxes[0], [cx - 16, cy - 16, cx + 16, cy + 16], atol=1e-4)
    assert found.scores[0] == pytest.approx(0.9)


@pytest.mark.parametrize("locator", ["centerface", "heads"])
def test_uint8_input_gives_bit_identical_detections(
    photo_detections: dict[str, tuple[np.ndarray, dict, Detections, Detections]],
    heads_dir: Path,
    locator: str,
) -> None:
    """The graph that takes the tiles' bytes and upscales them itself (what a GPU worker runs)
    finds exactly the boxes, with exactly the scores, of the host's upscale and float planes:
    every uint8 is exactly a float32, and both upscales are the same rounded bilinear. Also on
    crops of awkward sizes: where the graph pads after upscaling (CenterFace's multiples of 32;
    a 2x head tile narrower than the network) and where the host must upscale after all (a
    head tile that letterboxing then resizes)."""
    options = OnnxOptions(threads=0, tile_batch=1, uint8_input=1)
    make = {"centerface": lambda o: CenterFaceLocator(onnx_options=o),
            "heads": lambda o: HeadsLocator(heads_dir / HEADS_FILE, onnx_options=o)}[locator]
    on_bytes = make(options)
    assert on_bytes._session.uint8_input and on_bytes._session.get_inputs()[0].type == "tensor(uint8)"
    for name, (rgb, _meta, faces, heads) in photo_detections.items():
        planes = faces if locator == "centerface" else heads
        found = on_bytes.locate(rgb)
        assert len(found) > 0, name
        np.testing.assert_array_equal(found.boxes, planes.boxes, err_msg=name)
        np.testing.assert_array_equal(found.scores, planes.scores, err_msg=name)

    on_planes = make(OnnxOptions(threads=0, tile_batch=1, uint8_input=0))
    rgb = next(iter(photo_detections.values()))[0]
    steps: dict[tuple[int, int], set[tuple[int, tuple[int, int]]]] = {}
    infer = on_bytes._infer
    for h, w in [(250, 1000), (400, 300), (200, 300), (307, 541)]:
        crop = np.ascontiguousarray(rgb[100 : 100 + h, 50 : 50 + w])
        seen = steps.setdefault((h, w), set())

        def recording(batch: NetInput, seen: set = seen) -> list:
            seen.add((batch.upscale, batch.pad))
            return infer(batch)

        on_bytes._infer = recording  # type: ignore[method-assign]
        expected = on_planes.locate(crop)
        found = on_bytes.locate(crop)
        np.testing.assert_array_equal(found.boxes, expected.boxes, err_msg=f"{w}x{h}")
        np.testing.assert_array_equal(found.scores, expected.scores, err_msg=f"{w}x{h}")
    if locator == "centerface":
        # 500 rows at 2x, padded to 512 by the graph
        assert any(up == 2 and pad[0] == 12 for up, pad in steps[(250, 1000)])
    else:
        assert (2, (0, 40)) in steps[(400, 300)]  # a 2x tile 600 wide, padded to 640 by the graph
        # 600x400 at 2x would be resized again to fit 640x480: the host upscales that tile.
        assert all(up == 1 for up, _ in steps[(200, 300)])


@pytest.mark.parametrize("bgr", [False, True], ids=["rgb", "bgr"])
@pytest.mark.parametrize("upscale,pad", [(1, (0, 0)), (1, (3, 5)), (2, (0, 0)), (2, (6, 0)), (4, (0, 7)), (8, (0, 0))])
def test_a_graph_made_to_take_bytes_makes_the_planes_itself(bgr: bool, upscale: int, pad: tuple[int, int]) -> None:
    """``take_uint8_hwc`` on a graph that returns its input (at opset 9, as CenterFace ships):
    fed ``[N, h, w, 3]`` uint8 with an upscale and a padding, it returns bit for bit what the
    host's upscale (``Tile.scaled``) and ``planar_float32`` would have fed it, a valid ONNX
    model still."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from skimage import data

    from anonymiser.locators.onnx_models import PAD_INPUT, UPSCALE_INPUT, take_uint8_hwc

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["planes"], ["out"])], "identity",
        [helper.make_tensor_value_info("planes", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3, "H", "W"])],
    ), opset_imports=[helper.make_opsetid("", 9)], ir_version=4)
    model = take_uint8_hwc(model, bgr, fill=114)
    onnx.checker.check_model(model, full_check=True)
    run = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    # Random bytes, and a real photo's smooth gradients and edges.
    tiles_ = np.stack([rng.integers(0, 256, (37, 64, 3), dtype=np.uint8), data.astronaut()[200:237, 150:214]])
    (out,) = run.run(None, {run.get_inputs()[0].name: tiles_, UPSCALE_INPUT: np.array([upscale], np.float32),
                            PAD_INPUT: np.array(pad, np.int64)})
    height, width = 37 * upscale + pad[0], 64 * upscale + pad[1]
    expected = np.stack([planar_float32(Tile(t, 0, 0, upscale, upscale, upscale).scaled(), height, width, 114, bgr)
                         for t in tiles_])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_the_host_upscale_is_bilinear_rounded_half_up() -> None:
    """What both sides compute: OpenCV's exact bilinear upscale is the half-pixel bilinear
    value rounded half up (so a graph's Resize and Floor(x + 0.5) can match it bit for bit)."""
    from skimage import data

    tile = data.astronaut()[100:160, 300:380]

    def along(a: np.ndarray, axis: int) -> np.ndarray:
        # 2x with half-pixel centres: each output pixel is 3/4 of its nearest and 1/4 of the next.
        n = a.shape[axis]
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1, 1, 1]
        shape[axis] = -1
        weight = (src - lo).reshape(shape)
        return np.take(a, lo, axis) * (1 - weight) + np.take(a, hi, axis) * weight

    exact = along(along(tile.astype(np.float64), 0), 1)
    np.testing.assert_array_equal(Tile(tile, 0, 0, 2.0, 2.0, 2).scaled(), np.floor(exact + 0.5))


@pytest.mark.parametrize("h,w,height,width", [(480, 640, 480, 640), (37, 91, 64, 96), (1, 5, 32, 32)])
def test_network_input_as_bytes_is_the_padded_photo(h: int, w: int, height: int, width: int) -> None:
    """The bytes path pads with the fill and keeps RGB order (the graph reverses it), and an
    unpadded contiguous tile is passed on without a copy; an upscale is left to the graph with
    the padding after it, the bytes as they are."""
    from anonymiser.locators.tiling import network_input

    rgb = np.random.default_rng(h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    canvas = np.full((height, width, 3), 114, np.uint8)
    canvas[:h, :w] = rgb
    blob = network_input(rgb, height, width, uint8=True, fill=114, bgr=True)
    assert blob.pixels.dtype == np.uint8 and blob.pixels.flags.c_contiguous
    assert (blob.upscale, blob.pad) == (1, (0, 0))
    np.testing.assert_array_equal(blob.pixels, canvas)
    assert np.shares_memory(blob.pixels, rgb) == ((h, w) == (height, width))
    np.testing.assert_array_equal(network_input(rgb, height, width, uint8=False, fill=114, bgr=True).pixels,
                                  planar_float32(rgb, height, width, fill=114, bgr=True))
    if 2 * h <= height and 2 * w <= width:
        deferred = network_input(rgb, height, width, uint8=True, fill=114, bgr=True, upscale=2)
        assert (deferred.upscale, deferred.pad) == (2, (height - 2 * h, width - 2 * w))
        np.testing.assert_array_equal(deferred.pixels, rgb)
    with pytest.raises(ValueError):
        network_input(rgb, height, width, uint8=True, upscale=3 * max(height, width))  # does not fit
    with pytest.raises(ValueError):
        network_input(rgb, 2 * height, 2 * width, uint8=False, upscale=2)  # float planes: the host upscales


@pytest.mark.parametrize("width,height", [(640, 480), (1280, 960), (300, 100), (100, 300), (2000, 900), (20000, 400), (400, 20000)])
def test_letterbox_is_bgr_and_maps_back(width: int, height: int) -> None:
    """The head model's input is BGR float 3x480x640 (batched by the caller); a marker at (x, y) in the photo lands
    at (x, y) / factor in the network input, and padding is grey 114."""
    rgb = np.zeros((height, width, 3), np.uint8)
    mx, my = width * 3 // 5, height * 2 // 5
    s = min(max(4, width // 40, height // 40), min(width, height) // 3)
    rgb[my : my + s, mx : mx + s] = (255, 0, 0)  # pure red
    net, factor = letterbox(rgb)
    assert (net.upscale, net.pad) == (1, (0, 0))
    blob = net.pixels
    assert blob.shape == (3, 480, 640) and blob.dtype == np.float32
    assert factor == pytest.approx(max(width / 640, height / 480))
    nx, ny = int((mx + s / 2) / factor), int((my + s / 2) / factor)
    assert blob[2, ny, nx] > 200 and blob[0, ny, nx] < 50  # red sits in channel 2 (BGR)
    if width / height > 640 / 480 + 0.01:  # wide: padding at the bottom
        assert np.all(blob[:, -1, :] == 114)
    elif width / height < 640 / 480 - 0.01:  # tall: padding on the right
        assert np.all(blob[:, :, -1] == 114)


@pytest.mark.parametrize("bgr", [False, True], ids=["rgb", "bgr"])
@pytest.mark.parametrize("h,w,height,width", [(480, 640, 480, 640), (37, 91, 64, 96), (1, 5, 32, 32), (300, 1, 320, 32)])
def test_planar_float32_is_the_transposed_photo_on_a_filled_canvas(bgr: bool, h: int, w: int, height: int, width: int) -> None:
    """The plane-by-plane copy gives exactly what the one-line transpose gave (the old code)."""
    rgb = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    canvas = np.full((height, width, 3), 114, np.uint8)
    canvas[:h, :w] = rgb
    expected = (canvas[:, :, ::-1] if bgr else canvas).transpose(2, 0, 1).astype(np.float32)
    blob = planar_float32(rgb, height, width, fill=114, bgr=bgr)
    assert blob.dtype == np.float32 and blob.flags.c_contiguous
    np.testing.assert_array_equal(blob, expected)
    # Views (a crop with strides of the whole photo) are read correctly too.
    wide = np.zeros((h, w + 7, 3), np.uint8)
    wide[:, 3 : 3 + w] = rgb
    np.testing.assert_array_equal(planar_float32(wide[:, 3 : 3 + w], height, width, fill=114, bgr=bgr), expected)


def test_letterbox_of_a_strip_costs_what_the_strip_costs() -> None:
    """A 1x200,000 strip (within any pixel budget) was padded to 4:3 at full size before
    shrinking: a 150,000x200,000 canvas. Shrinking first keeps the peak at the strip's size."""
    import tracemalloc

    strip = np.full((1, 200_000, 3), 200, np.uint8)
    tracemalloc.start()
    net, factor = letterbox(strip)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50_000_000, f"letterbox of a 600 kB strip allocated {peak:,} bytes"
    assert factor == pytest.approx(200_000 / 640)
    assert np.all(net.pixels[:, 0, :] == 200) and np.all(net.pixels[:, 1:, :] == 114)
