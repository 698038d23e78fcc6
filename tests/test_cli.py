"""The ``anonymise`` command as users run it: ``python -m anonymiser`` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anonymiser.cover import CoverStyle

from imaging import REPO, HEADS_FILE, assert_clean_output, decode_output, jpeg_with_metadata, png_bytes


def run_cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m anonymiser ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "anonymiser", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def small_astronaut(astronaut: np.ndarray) -> np.ndarray:
    """The astronaut at 256x256: the face is still found, and the CLI runs stay fast."""
    return np.ascontiguousarray(astronaut[::2, ::2])


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, small_astronaut: np.ndarray) -> Path:
    """Two good images (one PNG named .jpg) and one truncated JPEG."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "good.jpg").write_bytes(jpeg_with_metadata(small_astronaut))
    (folder / "wrongext.jpg").write_bytes(png_bytes(small_astronaut))
    broken = jpeg_with_metadata(small_astronaut)
    (folder / "broken.jpg").write_bytes(broken[: len(broken) // 2])
    (folder / "notes.txt").write_text("not an image; ignored by suffix")
    return folder


@pytest.fixture(scope="module")
def mixed_run(centerface_available: None, mixed_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, dict]:
    """One CLI run over the mixed folder with --locator centerface --style solid --report."""
    out = tmp_path_factory.mktemp("out")
    report = out / "report.json"
    proc = run_cli(mixed_folder, "-o", out, "--report", report, "--locator", "centerface", "--style", "solid")
    return proc, out, json.loads(report.read_text()) if report.exists() else {}


def test_failure_gives_exit_status_1_and_a_clear_line(mixed_run: tuple[subprocess.CompletedProcess[str], Path, dict], mixed_folder: Path) -> None:
    """One bad file among good ones: exit status 1 and 'FAILED <path>: <reason>' on stderr."""
    proc, _, _ = mixed_run
    assert proc.returncode == 1, proc.stderr
    bad = mixed_folder / "broken.jpg"
    match = re.search(rf"^FAILED {re.escape(str(bad))}: (.+)$", proc.stderr, re.MULTILINE)
    assert match, proc.stderr
    assert "damaged or truncated" in match.group(1)
    assert "1 of 3 file(s) failed" in proc.stderr
    assert "notes.txt" not in proc.stderr


def test_good_files_are_written_clean(mixed_run: tuple[subprocess.CompletedProcess[str], Path, dict]) -> None:
    """Both good inputs are written despite the failure; the PNG named .jpg is sniffed as PNG
    and stays PNG; outputs carry no metadata."""
    _, out, _ = mixed_run
    written = sorted(p.name for p in out.iterdir() if p.name != "report.json")
    assert written == ["good_anonymised.jpg", "wrongext_anonymised.png"]
    assert (out / "good_anonymised.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert (out / "wrongext_anonymised.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in written:
        assert_clean_output((out / name).read_bytes())


def test_report_is_keyed_by_input_path(mixed_run: tuple[subprocess.CompletedProcess[str], Path, dict], mixed_folder: Path) -> None:
    """--report writes JSON keyed by input path: regions and the output path for good files,
    an error code and message for the bad one; --locator centerface is honoured."""
    _, out, report = mixed_run
    assert set(report) == {str(mixed_folder / n) for n in ("good.jpg", "wrongext.jpg", "broken.jpg")}
    bad = report[str(mixed_folder / "broken.jpg")]
    assert bad["error"] == "corrupt_image" and bad["message"]
    for name, fmt in (("good.jpg", "jpeg"), ("wrongext.jpg", "png")):
        entry = report[str(mixed_folder / name)]
        assert entry["locators"] == ["centerface"]
        assert entry["input_format"] == fmt and entry["output_format"] == fmt
        assert Path(entry["output"]).parent == out and Path(entry["output"]).is_file()
        assert entry["regions"], f"no region for {name}"
        for region in entry["regions"]:
            x1, y1, x2, y2 = region["box"]
            assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256
            assert region["sources"]


def test_style_solid_is_honoured(mixed_run: tuple[subprocess.CompletedProcess[str], Path, dict], mixed_folder: Path) -> None:
    """--style solid paints every reported region in the plain colour (checked on PNG output)."""
    _, out, report = mixed_run
    pixels = decode_output((out / "wrongext_anonymised.png").read_bytes())
    for region in report[str(mixed_folder / "wrongext.jpg")]["regions"]:
        x1, y1, x2, y2 = region["box"]
        assert np.all(pixels[y1:y2, x1:x2] == CoverStyle().colour)


def test_all_good_gives_exit_status_0(heads_dir: Path, small_astronaut: np.ndarray, tmp_path: Path) -> None:
    """When every file succeeds the exit status is 0; with --weights every installed locator
    (CenterFace and the head model) is used by default; files given directly work too."""
    source = tmp_path / "photo.jpeg"
    source.write_bytes(jpeg_with_metadata(small_astronaut, orientation=3))
    out = tmp_path / "out"
    report = tmp_path / "r.json"
    proc = run_cli(source, "-o", out, "--report", report, "--weights", heads_dir)
    assert proc.returncode == 0, proc.stderr
    assert "FAILED" not in proc.stderr
    entry = json.loads(report.read_text())[str(source)]
    assert {"centerface", "heads"} <= set(entry["locators"])
    assert entry["orientation"] == 3
    data = (out / "photo_anonymised.jpg").read_bytes()
    assert_clean_output(data)
    upside_down = decode_output(data)
    # orientation 3 was applied: the output is the upright (unrotated) astronaut outside regions
    mask = np.zeros(upside_down.shape[:2], bool)
    for region in entry["regions"]:
        x1, y1, x2, y2 = region["box"]
        mask[y1:y2, x1:x2] = True
    assert np.abs(upside_down.astype(int) - small_astronaut[::-1, ::-1].astype(int))[~mask].mean() < 8


def test_no_images_found_is_an_error(centerface_available: None, tmp_path: Path) -> None:
    """A folder without image files is reported and exits with status 1."""
    (tmp_path / "readme.txt").write_text("nothing here")
    proc = run_cli(tmp_path, "-o", tmp_path / "out", "--locator", "centerface")
    assert proc.returncode == 1
    assert "no image files" in proc.stderr


def test_check_weights_reports_ok(centerface_available: None, heads_dir: Path) -> None:
    """check-weights verifies, loads and runs each installed locator and prints ok."""
    proc = run_cli("check-weights", "--weights", heads_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^\s*heads\s+ok", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^\s*centerface\s+ok", proc.stdout, re.MULTILINE), proc.stdout
    assert "BROKEN" not in proc.stdout


def test_check_weights_flags_a_damaged_model(centerface_available: None, heads_dir: Path, tmp_path: Path) -> None:
    """A damaged head model is reported BROKEN and the exit status is 1."""
    damaged = tmp_path / HEADS_FILE
    shutil.copyfile(heads_dir / HEADS_FILE, damaged)
    data = bytearray(damaged.read_bytes())
    data[1000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    proc = run_cli("check-weights", "--weights", tmp_path)
    assert proc.returncode == 1
    assert re.search(r"^\s*heads\s+BROKEN: .*sha256", proc.stdout, re.MULTILINE), proc.stdout


def test_demo_writes_the_astronaut(centerface_available: None, tmp_path: Path) -> None:
    """'demo OUTDIR' anonymises the bundled astronaut photo into OUTDIR and says so."""
    proc = run_cli("demo", tmp_path / "demo", env={"ANON_WEIGHTS_DIR": str(tmp_path / "no-weights")})
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "demo" / "astronaut_anonymised.png"
    assert target.is_file()
    assert str(target.resolve()) in proc.stdout
    match = re.search(r"Covered (\d+) head\(s\)", proc.stdout)
    assert match and int(match.group(1)) >= 1
    data = target.read_bytes()
    assert_clean_output(data)
    with Image.open(target) as image:
        assert image.size == (512, 512)


def test_bad_settings_and_outputs_are_one_line_errors(centerface_available: None, tmp_path: Path) -> None:
    """A bad ANON_* variable, an output path that is a file and 'demo --help' give a one-line
    reason (or the help) and exit status 2 or 0, never a traceback or a folder named --help."""
    photo = tmp_path / "p.png"
    photo.write_bytes(png_bytes(np.full((32, 32, 3), 200, np.uint8)))
    for env in ({"ANON_MAX_INPUT_BYTES": "abc"}, {"ANON_ONNX_THREADS": "-3"}):
        for args in ((photo, "-o", tmp_path / "out"), ("demo", tmp_path / "demo")):
            proc = run_cli(*args, env=env)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert next(iter(env)) in proc.stderr
    occupied = tmp_path / "a-file"
    occupied.write_text("x")
    proc = run_cli(photo, "-o", occupied)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not a folder" in proc.stderr
    proc = run_cli("demo", "--help", env={"ANON_WEIGHTS_DIR": str(tmp_path / "none")})
    assert proc.returncode == 0 and "usage: anonymise demo" in proc.stdout
    assert not (REPO / "--help").exists() and not (tmp_path / "--help").exists()


def test_an_unexpected_error_fails_one_file_not_the_batch(
    centerface_available: None, small_astronaut: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running out of memory on one hostile file (or any error nobody foresaw) is that file's
    failure: the batch goes on, the report says what happened, the exit status is 1."""
    from anonymiser import cli

    real = cli.Anonymiser.anonymise

    def anonymise(self: cli.Anonymiser, data: bytes) -> object:
        if data == b"\x89PNG hostile":
            raise MemoryError()
        return real(self, data)

    monkeypatch.setattr(cli.Anonymiser, "anonymise", anonymise)
    (tmp_path / "a_hostile.png").write_bytes(b"\x89PNG hostile")
    (tmp_path / "b_photo.png").write_bytes(png_bytes(small_astronaut))
    report = tmp_path / "r.json"
    status = cli.run([str(tmp_path), "-o", str(tmp_path / "out"), "--report", str(report), "--locator", "centerface"])
    assert status == 1
    entries = json.loads(report.read_text())
    assert entries[str(tmp_path / "a_hostile.png")] == {
        "error": "internal_error", "message": "unexpected MemoryError while anonymising this file"}
    assert (tmp_path / "out" / "b_photo_anonymised.png").is_file()
    assert entries[str(tmp_path / "b_photo.png")]["heads_covered"] >= 1


def test_existing_files_in_the_output_folder_are_never_overwritten(
    centerface_available: None, small_astronaut: np.ndarray, tmp_path: Path
) -> None:
    """``-o`` naming the input folder (or a folder holding an earlier run's outputs): a file
    already carrying the output's name is the user's, and stays as it was."""
    (tmp_path / "a.jpg").write_bytes(jpeg_with_metadata(small_astronaut))
    theirs = tmp_path / "a_anonymised.jpg"
    theirs.write_bytes(b"someone's own file")
    proc = run_cli(tmp_path / "a.jpg", "-o", tmp_path, "--locator", "centerface")
    assert proc.returncode == 0, proc.stderr
    assert theirs.read_bytes() == b"someone's own file"
    assert_clean_output((tmp_path / "a_anonymised_2.jpg").read_bytes())
