"""Loading (and, for tests, writing) LSC-CNN checkpoints (spec §1.4, §6.2-§6.3).

Trust policy
------------
A ``.pth`` file is a pickle, and unpickling with ``weights_only=False`` can run arbitrary code. So:

1. The file's size and MD5 are checked **before anything is unpickled**. By default the expected
   values are those of the official ``scale_4_epoch_46.pth``; any other file is refused.
2. Other files (the bare ~140 MB weight files some forks publish, checkpoints generated in tests)
   are accepted only when the caller names their exact ``expected_size``/``expected_md5``, or sets
   ``trust_unverified=True`` (and passes ``expected_md5=None``) to load a file nobody can vouch for.
3. Unpickling always starts with ``torch.load(weights_only=True)``, which only rebuilds tensors and
   plain containers. Only if that fails **and** the file is byte-for-byte the official one (its MD5
   matched :data:`OFFICIAL_MD5`) do we retry with ``weights_only=False``.
4. Whatever was loaded must carry exactly the 116 tensors of the architecture with the right shapes,
   finite values, after unwrapping ``'state_dict'`` and stripping a ``module.`` prefix.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import WeightsError
from .lsccnn_net import LSCCNN, state_dict_manifest

OFFICIAL_FILENAME = "scale_4_epoch_46.pth"
OFFICIAL_SIZE = 280_644_611
OFFICIAL_MD5 = "c7f2cf398efbc5cc94282f296f6337ff"

# Pickle protocol >= 2 opens with PROTO (0x80, version); PyTorch's legacy format then pickles its
# magic number 0x1950a86a20f9469cfc6c as a LONG1 (0x8a) of 10 bytes.
_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 20

_HOW_TO_GET = (
    f"download the official LSC-CNN UCF-QNRF checkpoint '{OFFICIAL_FILENAME}' "
    f"({OFFICIAL_SIZE:,} bytes, md5 {OFFICIAL_MD5}) into the weights directory"
)


def file_md5(path: Path) -> str:
    """MD5 hex digest of a file, read in 1 MiB chunks (the checkpoint is 280 MB)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sniff_format(head: bytes) -> str:
    """``'legacy'`` or ``'zip'`` from the first bytes of a torch.save file, else ``'unknown'``."""
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) >= 2 + len(_LEGACY_MAGIC) and head[0] == 0x80 and head[2 : 2 + len(_LEGACY_MAGIC)] == _LEGACY_MAGIC:
        return "legacy"
    return "unknown"


def _verify_file(path: Path, expected_size: int | None, expected_md5: str | None) -> str:
    """Check existence, size, header and checksum; return the MD5. Nothing is unpickled here."""
    if not path.is_file():
        raise WeightsError(f"LSC-CNN weights not found at {path}: {_HOW_TO_GET}")
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise WeightsError(
            f"LSC-CNN weights {path} are {size:,} bytes, expected {expected_size:,} "
            "(incomplete download or a different file); replace the file: " + _HOW_TO_GET
        )
    with open(path, "rb") as fh:
        head = fh.read(16)
    if sniff_format(head) == "unknown":
        raise WeightsError(
            f"{path} is not a PyTorch checkpoint (unrecognised header {head[:8].hex()}); " + _HOW_TO_GET
        )
    md5 = file_md5(path)
    if expected_md5 is not None and md5 != expected_md5.lower():
        raise WeightsError(
            f"LSC-CNN weights {path} have md5 {md5}, expected {expected_md5} (corrupted or "
            "tampered file, or a different checkpoint); it was not loaded. Replace it: " + _HOW_TO_GET
        )
    return md5


def _unpickle(path: Path, md5: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - any failure here means "not loadable safely"
        if md5 != OFFICIAL_MD5:
            raise WeightsError(
                f"could not load {path} as plain tensors ({type(safe_error).__name__}: {safe_error}); "
                "the file is damaged or not an LSC-CNN checkpoint. " + _HOW_TO_GET
            ) from safe_error
    # Only reached for the byte-exact official file, whose pickle we know to be benign.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise WeightsError(f"could not load the official checkpoint {path}: {error}") from error


def _as_state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state_dict; " + _HOW_TO_GET)
    # Weights saved from a DataParallel wrapper carry 'module.' on every key.
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def validate_state_dict(state: Mapping[str, Any], source: str = "state_dict") -> "OrderedDict[str, torch.Tensor]":
    """Check keys, shapes and values against the architecture; return float32 CPU tensors in order."""
    manifest = state_dict_manifest()
    expected = [k for k, _ in manifest]
    expected_set = set(expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected_set]
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not match the LSC-CNN scale_4 architecture: "
            f"{len(missing)} missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; "
            "this is a different network (e.g. the ResNet variant or another scale). " + _HOW_TO_GET
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in manifest:
        value = state[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise WeightsError(f"{source}: '{key}' is not a floating-point tensor")
        if tuple(value.shape) != shape:
            raise WeightsError(f"{source}: '{key}' has shape {tuple(value.shape)}, expected {shape}")
        value = value.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(value).all():
            raise WeightsError(f"{source}: '{key}' contains NaN or infinite values; the file is damaged")
        out[key] = value
    return out


def load_state_dict(
    path: str | Path,
    *,
    expected_size: int | None = OFFICIAL_SIZE,
    expected_md5: str | None = OFFICIAL_MD5,
    trust_unverified: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """Verify and load LSC-CNN weights from ``path`` into a validated CPU float32 state_dict.

    Accepts the official wrapped checkpoint, a bare state_dict and ``module.``-prefixed keys.
    ``expected_size=None`` skips the size check. ``expected_md5=None`` (no checksum at all) is
    only allowed together with ``trust_unverified=True``. Raises :class:`WeightsError` for every
    problem with the file.
    """
    path = Path(path)
    if expected_md5 is None and not trust_unverified:
        raise WeightsError(
            f"refusing to load {path} without a checksum; pass its expected_md5, "
            "or trust_unverified=True to accept an unverified file"
        )
    md5 = _verify_file(path, expected_size, expected_md5)
    obj = _unpickle(path, md5)
    return validate_state_dict(_as_state_dict(obj, path), source=str(path))


def load_model(
    path: str | Path,
    *,
    expected_size: int | None = OFFICIAL_SIZE,
    expected_md5: str | None = OFFICIAL_MD5,
    trust_unverified: bool = False,
) -> LSCCNN:
    """An eval-mode :class:`LSCCNN` on CPU with the weights of ``path`` (see :func:`load_state_dict`)."""
    state = load_state_dict(
        path, expected_size=expected_size, expected_md5=expected_md5, trust_unverified=trust_unverified
    )
    # Built on the meta device and filled by assignment: skips a pointless 35M-parameter random init.
    with torch.device("meta"):
        model = LSCCNN()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _legacy_save(obj: Any, path: str | Path) -> None:
    # Same container format as the official file: legacy (pre-1.6) serialization, pickle protocol 2.
    torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=2)


def write_official_format_checkpoint(model: LSCCNN, path: str | Path, include_optimizer: bool) -> None:
    """Save ``model`` the way the official training loop did (spec §6.2).

    ``{'epoch': 46, 'state_dict': ..., 'optimizer': SGD state}`` in the legacy format. With
    ``include_optimizer`` the SGD state has a zero momentum buffer per parameter keyed by ``id()``
    (as torch 0.4.1 did), which makes the file about the official size (~280 MB); without it the
    key is omitted and the file is half as large.
    """
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    checkpoint: dict[str, Any] = {"epoch": 46, "state_dict": state}
    if include_optimizer:
        params = list(model.parameters())
        ids = [id(p) for p in params]
        checkpoint["optimizer"] = {
            "state": {i: {"momentum_buffer": torch.zeros_like(p, device="cpu")} for i, p in zip(ids, params)},
            "param_groups": [
                {
                    "lr": 0.001,
                    "momentum": 0.9,
                    "dampening": 0,
                    "weight_decay": 0.0001,
                    "nesterov": False,
                    "params": ids,
                }
            ],
        }
    _legacy_save(checkpoint, path)


def write_bare_state_dict(model: LSCCNN, path: str | Path, *, key_prefix: str = "") -> None:
    """Save only the weights (as the forks' ``*_weights.pth`` files), optionally key-prefixed.

    ``key_prefix='module.'`` reproduces weights saved from a DataParallel wrapper.
    """
    state = OrderedDict((key_prefix + k, v.detach().cpu()) for k, v in model.state_dict().items())
    _legacy_save(state, path)
