"""How the batched LSC-CNN engine runs: its options, read from ``ANON_LSCCNN_*`` variables and
validated at start-up, the defaults each device gets (precision, batch and tile limits), and the
checkpoint it accepts.

Kept apart from the engine so that the worker's start-up check can validate the settings
without building a model.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..locators.lsccnn import DEFAULT_MAX_TILE_PIXELS, DEFAULT_TILE_MARGIN, MIN_TILE_MARGIN
from ..locators.lsccnn_decode import DEFAULT_NMS_THRESHOLD
from ..locators.lsccnn_net import INPUT_MULTIPLE

#: autocast dtype of each precision name (``None``: float32 storage). "fp32" is IEEE float32, the
#: reference's arithmetic; "tf32" keeps float32 tensors but lets CUDA convolutions round their
#: inputs to TF32's 10 mantissa bits (tensor cores, about half the bf16 rate on an H200).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}

#: defaults on CPU: (max_tile_pixels, max_batch_pixels)
CPU_LIMITS = (DEFAULT_MAX_TILE_PIXELS, 4_000_000)

#: default ``timeout_s`` on CUDA: far above a batch's fraction of a second, and above a first
#: ``torch.compile`` of a new shape, which runs on the device thread
CUDA_TIMEOUT_S = 300.0

#: Activation memory per input pixel at the peak of a forward pass, in bytes: about 2 GB per
#: megapixel in float32 (spec §1.3's measured RSS), half that in fp16/bf16. An estimate: the
#: GPU benchmark prints the real peak for each batch size.
BYTES_PER_PIXEL = {"fp32": 2000, "tf32": 2000, "bf16": 1000, "fp16": 1000}


def cuda_limits(device: torch.device, precision: str) -> tuple[int, int]:
    """(max_tile_pixels, max_batch_pixels) so that a batch stays within 60 % of the GPU's memory."""
    total = torch.cuda.get_device_properties(device).total_memory
    batch = int(0.6 * total / BYTES_PER_PIXEL[precision])
    return min(8_388_608, batch), batch


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else as ``torch.device`` reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_precision(device: torch.device) -> str:
    """fp16 on a CUDA GPU, fp32 on CPU.

    fp16 and bf16 run at the same tensor-core rate on current GPUs; fp16 keeps 3 more mantissa
    bits, so its detections are closer to the float32 reference (with random weights on CPU:
    98.5-99.4 % identical boxes against 94-95 % for bf16). Its narrow range is guarded: a piece
    whose logits overflow is run again in float32 (see :meth:`DeviceBatch.logits`); and checks
    against float32 switch the engine to float32 when fp16 would miss heads
    (:meth:`LSCCNNEngine.finish`).
    """
    return "fp16" if device.type == "cuda" else "fp32"


#: photos per float32 check when the precision is below float32 and ``check_every`` is not set:
#: each check costs one float32 pass of one photo (``bench/gpu.py`` prints the share it takes)
DEFAULT_CHECK_EVERY = 500

#: the issue's bar for a reduced precision against the float32 reference: identical boxes (over
#: all checks so far, once they hold this many reference boxes) and no reference head uncovered
CHECK_MIN_IDENTICAL = 0.99
CHECK_MIN_BOXES = 200

#: what a failed check does: run in float32 from then on, or only report it
CHECK_ACTIONS = ("fallback", "count")


@functools.lru_cache(maxsize=1)
def compile_modes() -> tuple[str, ...]:
    """The modes this torch's ``torch.compile`` accepts; empty when it does not say (a private
    function, so a torch without it checks nothing rather than refuses a valid mode)."""
    try:
        from torch._inductor import list_mode_options

        return tuple(list_mode_options())
    except Exception:  # noqa: BLE001 - any torch that cannot list them
        return ()


@dataclass(frozen=True)
class EngineOptions:
    """How :class:`LSCCNNEngine` runs (``None`` / ``"auto"``: chosen for the device)."""

    device: str = "auto"
    precision: str = "auto"  # "fp32", "tf32", "bf16", "fp16"
    channels_last: bool | None = None  # default: on CUDA only
    compile: bool = False
    compile_mode: str | None = None  # e.g. "max-autotune", "reduce-overhead" (CUDA graphs)
    compile_backend: str = "inductor"
    cudnn_benchmark: bool = True
    max_batch: int = 16
    max_batch_pixels: int | None = None
    bucket_multiple: int = 64
    max_tile_pixels: int | None = None
    tile_margin: int = DEFAULT_TILE_MARGIN
    nms_threshold: float = DEFAULT_NMS_THRESHOLD
    cpu_threads: int = field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)))
    #: pad every batch to its bucket's size and a count from 1, 2, 3, 4, 6, 8, 12, 16, 24, 32...
    #: so that shapes repeat (default: on CUDA, where cuDNN autotunes per shape, and when compiling)
    shape_stable: bool | None = None
    #: MicroBatcher: how long the first photo of a batch waits for companions
    max_wait_s: float = 0.005
    #: MicroBatcher: seconds a photo's piece may wait for its logits (queue, forward pass, copy)
    #: before its caller gets a DeviceFailure; 0: no limit. Default: 300 s on CUDA (a hung GPU
    #: must not hold a worker's task threads for ever: Celery's thread pool enforces no time
    #: limits), no limit on CPU, where a batch of large photos legitimately takes minutes.
    timeout_s: float | None = None
    #: below float32, run one photo in this many (the first one included) also in IEEE float32
    #: and compare (None: DEFAULT_CHECK_EVERY; 0: never; always 0 for fp32)
    check_every: int | None = None
    #: a failed check: "fallback" (float32 from then on) or "count" (reported only)
    check_action: str = "fallback"

    def problems(self) -> list[tuple[str, str]]:
        """Each inconsistent option as ``(field, message)``."""
        problems: list[tuple[str, str]] = []
        if self.precision not in ("auto", *PRECISIONS):
            problems.append(("precision", f"precision must be auto, fp32, tf32, bf16 or fp16, got {self.precision!r}"))
        if self.max_batch < 1:
            problems.append(("max_batch", f"max_batch must be at least 1, got {self.max_batch}"))
        if self.bucket_multiple < INPUT_MULTIPLE or self.bucket_multiple % INPUT_MULTIPLE:
            problems.append(("bucket_multiple", f"bucket_multiple must be a positive multiple of 16, got {self.bucket_multiple}"))
        if self.tile_margin < MIN_TILE_MARGIN or self.tile_margin % INPUT_MULTIPLE:
            problems.append(("tile_margin", f"tile_margin must be a multiple of 16 and >= {MIN_TILE_MARGIN}, got {self.tile_margin}"))
        smallest = (2 * self.tile_margin + INPUT_MULTIPLE) ** 2
        if self.max_tile_pixels is not None and self.max_tile_pixels < smallest:
            problems.append(("max_tile_pixels", f"max_tile_pixels must be >= {smallest} for tile_margin {self.tile_margin}"))
        if self.max_batch_pixels is not None and self.max_batch_pixels < smallest:
            problems.append(("max_batch_pixels", f"max_batch_pixels must be >= {smallest} (one tile) for tile_margin {self.tile_margin}"))
        if self.compile_mode is not None and compile_modes() and self.compile_mode not in compile_modes():
            # torch.compile's own refusal is a RuntimeError at warm-up, which a GPU worker
            # reports as a failing GPU (exit 69) instead of a setting to correct.
            problems.append(("compile_mode", f"compile_mode must be one of {', '.join(compile_modes())}, got {self.compile_mode!r}"))
        if (self.max_tile_pixels is not None and self.max_batch_pixels is not None
                and self.max_batch_pixels < self.max_tile_pixels):
            problems.append(("max_batch_pixels", "max_batch_pixels must be at least max_tile_pixels (one tile must fit a batch)"))
        if not 0.0 <= self.nms_threshold <= 1.0:
            problems.append(("nms_threshold", f"nms_threshold must be in [0, 1], got {self.nms_threshold}"))
        if self.cpu_threads < 1:
            problems.append(("cpu_threads", f"cpu_threads must be at least 1, got {self.cpu_threads}"))
        if not 0.0 <= self.max_wait_s <= 10.0:
            problems.append(("max_wait_s", f"max_wait_s must be between 0 and 10 s, got {self.max_wait_s}"))
        # Python's waits refuse anything past threading.TIMEOUT_MAX (OverflowError), "inf" included.
        if self.timeout_s is not None and not 0.0 <= self.timeout_s <= threading.TIMEOUT_MAX:
            problems.append(("timeout_s", "timeout_s must be 0 (no limit) or a positive number of seconds up to "
                                          f"{threading.TIMEOUT_MAX:.0f}, got {self.timeout_s}"))
        if self.check_every is not None and self.check_every < 0:
            problems.append(("check_every", f"check_every must be 0 (never) or a number of photos, got {self.check_every}"))
        if self.check_action not in CHECK_ACTIONS:
            problems.append(("check_action", f"check_action must be fallback or count, got {self.check_action!r}"))
        return problems

    def validate(self) -> None:
        """``ValueError`` listing every inconsistent option."""
        problems = self.problems()
        if problems:
            raise ValueError("invalid LSC-CNN engine options: " + "; ".join(message for _, message in problems))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "EngineOptions":
        """Options from ``ANON_LSCCNN_*`` variables; ``ValueError`` names every bad one at once.

        ``ANON_LSCCNN_DEVICE`` (auto, cpu, cuda, cuda:N), ``ANON_LSCCNN_PRECISION`` (auto, fp32,
        tf32, bf16, fp16), ``ANON_LSCCNN_CHANNELS_LAST`` (0/1), ``ANON_LSCCNN_COMPILE`` (0/1),
        ``ANON_LSCCNN_COMPILE_MODE``, ``ANON_LSCCNN_MAX_BATCH``, ``ANON_LSCCNN_BATCH_MEGAPIXELS``,
        ``ANON_LSCCNN_TILE_MEGAPIXELS``, ``ANON_LSCCNN_BUCKET``, ``ANON_LSCCNN_CPU_THREADS``,
        ``ANON_LSCCNN_BATCH_WAIT_MS``, ``ANON_LSCCNN_TIMEOUT_S``, ``ANON_LSCCNN_CHECK_EVERY``,
        ``ANON_LSCCNN_CHECK_ACTION``.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []

        variables: dict[str, str] = {}

        def read(name: str, key: str, convert: Callable[[str], Any]) -> None:
            variables[key] = name
            raw = env.get(name, "").strip()
            if not raw:
                return
            try:
                values[key] = convert(raw)
            except ValueError as exc:
                problems.append(f"{name}={raw!r}: {exc}")

        def flag(raw: str) -> bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")

        def device(raw: str) -> str:
            if raw != "auto":
                torch.device(raw)  # raises RuntimeError for nonsense
            return raw

        def megapixels(raw: str) -> int:
            value = float(raw)
            if not value > 0:
                raise ValueError("must be positive")
            return int(value * 1_000_000)

        def wrap(convert: Callable[[str], Any]) -> Callable[[str], Any]:
            def inner(raw: str) -> Any:
                try:
                    return convert(raw)
                except (RuntimeError, TypeError) as exc:
                    raise ValueError(str(exc)) from None
            return inner

        read("ANON_LSCCNN_DEVICE", "device", wrap(device))
        read("ANON_LSCCNN_PRECISION", "precision", str.lower)
        read("ANON_LSCCNN_CHANNELS_LAST", "channels_last", flag)
        read("ANON_LSCCNN_COMPILE", "compile", flag)
        read("ANON_LSCCNN_COMPILE_MODE", "compile_mode", str)
        read("ANON_LSCCNN_MAX_BATCH", "max_batch", int)
        read("ANON_LSCCNN_BATCH_MEGAPIXELS", "max_batch_pixels", megapixels)
        read("ANON_LSCCNN_TILE_MEGAPIXELS", "max_tile_pixels", megapixels)
        read("ANON_LSCCNN_BUCKET", "bucket_multiple", int)
        read("ANON_LSCCNN_CPU_THREADS", "cpu_threads", int)
        read("ANON_LSCCNN_BATCH_WAIT_MS", "max_wait_s", lambda raw: float(raw) / 1000.0)
        read("ANON_LSCCNN_TIMEOUT_S", "timeout_s", float)
        read("ANON_LSCCNN_CHECK_EVERY", "check_every", int)
        read("ANON_LSCCNN_CHECK_ACTION", "check_action", str.lower)
        values.update(overrides)
        options = cls(**values)
        for key, message in options.problems():
            problems.append(f"{variables[key]}: {message}" if key in variables and key not in overrides else message)
        if options.compile and (missing := missing_compiler(options.device, env)):
            problems.append(f"ANON_LSCCNN_COMPILE: torch.compile needs {missing} on PATH and none was found; install "
                            "one (the GPU image has gcc) or leave compiling off")
        if problems:
            raise ValueError("invalid LSC-CNN settings: " + "; ".join(problems))
        return options


def missing_compiler(device: str, environ: Mapping[str, str]) -> str | None:
    """What ``torch.compile`` would fail to find for ``device``, or None when it is there.

    On CUDA, Triton builds a small C launcher with ``$CC``, ``cc``, ``gcc`` or ``clang``; on the
    CPU, Inductor writes C++ and builds it with ``$CXX``, ``g++`` or ``clang++``. A slim image
    has neither, and the worker found out only at its warm-up, minutes into loading the model.
    """
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    names = (environ.get("CC", ""), "cc", "gcc", "clang") if cuda else (environ.get("CXX", ""), "g++", "clang++")
    if any(name and shutil.which(name, path=environ.get("PATH")) for name in names):
        return None
    return "a C compiler (cc, gcc or clang)" if cuda else "a C++ compiler (g++ or clang++)"


def checkpoint_expectations(environ: Mapping[str, str]) -> tuple[str, int | None]:
    """The MD5 and size (None: any) the batched locator's checkpoint must have: the official
    file's, or ``ANON_LSCCNN_MD5`` / ``ANON_LSCCNN_SIZE``. ``ValueError`` names both when bad,
    so the start-up check reports them instead of the warm-up."""
    from ..locators.lsccnn_checkpoint import OFFICIAL_MD5, OFFICIAL_SIZE

    md5 = environ.get("ANON_LSCCNN_MD5", "").strip().lower() or OFFICIAL_MD5
    size_raw = environ.get("ANON_LSCCNN_SIZE", "").strip()
    problems = []
    if md5 != OFFICIAL_MD5 and (len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5)):
        problems.append(f"ANON_LSCCNN_MD5 must be 32 hex digits, got {md5!r}")
    size: int | None = OFFICIAL_SIZE if md5 == OFFICIAL_MD5 else None
    if size_raw:
        try:
            size = int(size_raw)
            if size < 1:
                raise ValueError
        except ValueError:
            problems.append(f"ANON_LSCCNN_SIZE must be a positive number of bytes, got {size_raw!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return md5, size
