"""``anonymise INPUT... [-o OUTDIR] [--report FILE.json] [--locator ...] [--style ...]``.

Also ``anonymise check-weights`` (verify installed weights: size, checksum, loads, runs),
``anonymise demo`` (anonymise the public-domain astronaut photo that scikit-image ships) and
``anonymise serve`` (the local web page and HTTP API, see ``anonymiser/web/``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from . import emoji
from .cover import STYLES, CoverStyle
from .errors import AnonymiserError
from .limits import Limits
from .locators.registry import REGISTRY, WEIGHTS_DIR_HELP
from .pipeline import Anonymiser, Settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".heic", ".heif", ".avif", ".jfif"}
_EXTENSION = {"jpeg": ".jpg", "png": ".png"}


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files as given, and image files (by suffix) found recursively in folders."""
    paths: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            paths.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(path)
    return paths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anonymise",
        description="Cover every head in photos with an opaque raised fist; strip all metadata.",
        epilog="Other commands: 'anonymise demo', 'anonymise check-weights' and 'anonymise serve' (local web page).",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    parser.add_argument("-o", "--outdir", type=Path, default=Path("anonymised"), help="output folder (default: ./anonymised)")
    parser.add_argument("--report", type=Path, help="write a JSON report keyed by input path")
    parser.add_argument("--locator", action="append", choices=sorted(REGISTRY), help="locator to use (repeatable; default: every one whose weights are present)")
    parser.add_argument("--style", choices=STYLES, default="emoji")
    parser.add_argument("--skin-tone", choices=sorted(emoji.SKIN_TONES), default=emoji.DEFAULT_TONE)
    parser.add_argument("--no-safeguard", action="store_true", help="do not fill gaps between packed heads")
    parser.add_argument("--no-residual", action="store_true", help="skip the second face pass over the covered image")
    parser.add_argument("--weights", type=Path, default=None, help=WEIGHTS_DIR_HELP)
    return parser


def _output_path(outdir: Path, source: Path, fmt: str, used: set[Path]) -> Path:
    candidate = outdir / (source.stem + "_anonymised" + _EXTENSION[fmt])
    counter = 2
    # Never over a file already there: with ``-o`` naming the input folder, an earlier run's
    # output (or a photo that happens to carry the name) would be lost.
    while candidate in used or candidate.exists():
        candidate = outdir / f"{source.stem}_anonymised_{counter}{_EXTENSION[fmt]}"
        counter += 1
    used.add(candidate)
    return candidate


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The anonymiser settings chosen by the options both ``anonymise`` and ``serve`` accept."""
    return Settings(
        locators=tuple(args.locator) if args.locator else None,
        style=CoverStyle(style=args.style, skin_tone=args.skin_tone),
        limits=Limits.from_env(),
        safeguard=not args.no_safeguard,
        residual_pass=not args.no_residual,
    )


def _failure(exc: Exception) -> dict[str, str]:
    """The report entry of a file that failed: the typed error's code and sentence, the OS's
    reason, or (for an error nobody expected, e.g. running out of memory) its type."""
    if isinstance(exc, AnonymiserError):
        return {"error": exc.code, "message": str(exc)}
    if isinstance(exc, OSError):
        return {"error": "os_error", "message": exc.strerror or str(exc)}
    return {"error": "internal_error", "message": f"unexpected {type(exc).__name__} while anonymising this file"}


def run(argv: Sequence[str]) -> int:
    """Anonymise files; returns the process exit status (1 if any file failed)."""
    args = _parser().parse_args(argv)
    try:
        anonymiser = Anonymiser(settings_from_args(args), weights_dir=args.weights)
    except (AnonymiserError, ValueError) as exc:  # ValueError: a bad ANON_* variable
        print(f"anonymise: {exc}", file=sys.stderr)
        return 2
    paths = expand_inputs(args.inputs)
    if not paths:
        print("anonymise: no image files found in the given inputs", file=sys.stderr)
        return 1
    if not _make_outdir(args.outdir):
        return 2
    reports: dict[str, dict] = {}
    used: set[Path] = set()
    failed = 0
    names = ", ".join(l.name for l in anonymiser.locators)
    print(f"anonymise: {len(paths)} file(s), locators: {names}", file=sys.stderr)
    for path in tqdm(paths, unit="img", disable=len(paths) < 2 or not sys.stderr.isatty(), file=sys.stderr):
        try:
            data = path.read_bytes()
            result = anonymiser.anonymise(data)
        except Exception as exc:  # one bad file must not end the batch, whatever it raises
            failed += 1
            reports[str(path)] = _failure(exc)
            tqdm.write(f"FAILED {path}: {reports[str(path)]['message']}", file=sys.stderr)
            continue
        target = _output_path(args.outdir, path, result.report.output_format, used)
        target.write_bytes(result.data)
        reports[str(path)] = result.report.to_dict() | {"output": str(target)}
        tqdm.write(f"ok     {path} -> {target} ({result.report.heads_covered} heads covered)", file=sys.stderr)
    if args.report:
        args.report.write_text(json.dumps(reports, indent=2))
    if failed:
        print(f"anonymise: {failed} of {len(paths)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _make_outdir(outdir: Path) -> bool:
    """Create the output folder; False (and a one-line reason) when it cannot be used."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        print(f"anonymise: the output folder {outdir} exists and is not a folder", file=sys.stderr)
        return False
    except OSError as exc:
        print(f"anonymise: cannot create the output folder {outdir}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


def demo(argv: Sequence[str] = ()) -> int:
    """Anonymise scikit-image's public-domain astronaut photo (NASA) and say where it went."""
    import io

    from PIL import Image
    from skimage import data as skdata

    parser = argparse.ArgumentParser(prog="anonymise demo", description=demo.__doc__)
    parser.add_argument("outdir", nargs="?", type=Path, default=Path("anonymised"), help="output folder (default: ./anonymised)")
    outdir = parser.parse_args(list(argv)).outdir
    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buffer, format="PNG")
    try:
        anonymiser = Anonymiser(Settings(limits=Limits.from_env()))
    except (AnonymiserError, ValueError) as exc:
        print(f"anonymise: {exc}", file=sys.stderr)
        return 2
    result = anonymiser.anonymise(buffer.getvalue())
    if not _make_outdir(outdir):
        return 2
    target = outdir / ("astronaut_anonymised" + _EXTENSION[result.report.output_format])
    target.write_bytes(result.data)
    locators = ", ".join(result.report.locators)
    print(f"Covered {result.report.heads_covered} head(s) with locators {locators}.")
    print(f"Result written to {target.resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``anonymise`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return demo(argv[1:])
    if argv and argv[0] == "check-weights":
        from .weights_check import main as check

        return check(argv[1:])
    if argv and argv[0] == "serve":
        from .web.server import main as serve

        return serve(argv[1:])
    return run(argv)
