"""A GPU worker's failures that only a GPU produces, simulated on the CPU: errors of the ONNX
locators on ONNX Runtime's CUDA provider, and warm-up errors that are not RuntimeErrors."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from anonymiser.errors import DeviceFailure
from anonymiser.locators import registry
from anonymiser.locators.base import Detections
from anonymiser.pipeline import Settings
from bot import accelerated, tasks


class _Session:
    def __init__(self, provider: str) -> None:
        self.provider = provider

    def get_providers(self) -> list[str]:
        return [self.provider, "CPUExecutionProvider"]


class _OnnxLocator:
    """Stands for CenterFace or the head model: ``_session`` is what ``on_device`` reads."""

    name = "centerface"
    kind = "face"

    def __init__(self, provider: str, error: Exception | None) -> None:
        self._session = _Session(provider)
        self.error = error

    def locate(self, rgb: np.ndarray) -> Detections:
        if self.error is not None:
            raise self.error
        return Detections()


def _gpu_anonymiser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, locator: _OnnxLocator,  # type: ignore[no-untyped-def]
                    on_success: Any = None):
    entry = registry.LocatorEntry("centerface", "test", lambda _weights: True, lambda _weights: locator)
    monkeypatch.setitem(registry.REGISTRY, "centerface", entry)
    return accelerated.build_anonymiser(Settings(locators=("centerface",)), weights_dir=tmp_path, on_success=on_success)


def test_an_onnx_runtime_failure_on_cuda_is_a_device_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CenterFace runs before LSC-CNN: when the GPU fails, ONNX Runtime's error comes first, and
    it must hand the job over like LSC-CNN's, not dead-letter it as the photo's fault."""
    rgb = np.zeros((32, 32, 3), np.uint8)
    for error in (ort_errors.Fail("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory"),
                  ort_errors.RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDNN failure 5000"),
                  ort_errors.EPFail("[ONNXRuntimeError] : 11 : EP_FAIL")):
        anonymiser = _gpu_anonymiser(monkeypatch, tmp_path, _OnnxLocator("CUDAExecutionProvider", error))
        with pytest.raises(DeviceFailure, match=type(error).__name__) as caught:
            anonymiser.locate(rgb)
        assert caught.value.__cause__ is error
        # the residual pass uses the same (guarded) locator
        assert anonymiser._residual is anonymiser.locators[0]


def test_onnx_errors_on_the_cpu_and_bad_inputs_stay_as_they_are(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3), np.uint8)
    cpu = ort_errors.Fail("a CPU session's failure is no device's")
    with pytest.raises(ort_errors.Fail):
        _gpu_anonymiser(monkeypatch, tmp_path, _OnnxLocator("CPUExecutionProvider", cpu)).locate(rgb)
    wrong = ort_errors.InvalidArgument("a bug, not the GPU")
    with pytest.raises(ort_errors.InvalidArgument):
        _gpu_anonymiser(monkeypatch, tmp_path, _OnnxLocator("CUDAExecutionProvider", wrong)).locate(rgb)
    fine = _gpu_anonymiser(monkeypatch, tmp_path, _OnnxLocator("CUDAExecutionProvider", None))
    assert len(fine.locate(rgb)[0]) == 0
    assert fine.locators[0].name == "centerface" and fine.locators[0].kind == "face"


@pytest.mark.parametrize("error", [
    AssertionError("Invalid device id"),  # torch.cuda: ANON_LSCCNN_DEVICE=cuda:1 on a one-GPU machine
    AssertionError("Torch not compiled with CUDA enabled"),  # a GPU worker on the CPU image
    ort_errors.Fail("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 100: no CUDA-capable device"),
])
def test_any_warm_up_failure_stops_the_gpu_worker(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Celery swallows what a worker_init handler raises, SystemExit aside: a warm-up error that
    escaped would leave a worker that announces itself and fails every job."""

    class Broken:
        def locate(self, rgb: Any) -> Any:
            raise error

    monkeypatch.setattr(tasks, "anonymiser", lambda: Broken())
    with pytest.raises(SystemExit) as exited:
        tasks._warm_up()
    assert exited.value.code == tasks.EX_UNAVAILABLE


def test_a_gpu_run_of_an_onnx_locator_clears_the_failures_in_a_row(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """A worker without LSC-CNN has no batch to clear its device failures: each ONNX run on the
    GPU that succeeds does, so three transient errors days apart never take it out of rotation."""
    health = tasks.DeviceHealth()
    health.failed(), health.failed()
    anonymiser = _gpu_anonymiser(monkeypatch, tmp_path, _OnnxLocator("CUDAExecutionProvider", None), health.succeeded)
    anonymiser.locate(np.zeros((32, 32, 3), np.uint8))
    assert health.failed() == 1


def test_onnx_successes_do_not_hide_an_lsccnn_that_always_fails(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """With LSC-CNN among the locators, only its batches clear the count: CenterFace runs first
    in every job, and its successes would reset the count before each LSC-CNN failure, so a
    worker whose LSC-CNN always fails would never leave rotation."""

    class FailingLsccnn:
        name, kind = "lsccnn", "head"

        def locate(self, rgb: np.ndarray) -> Detections:
            raise DeviceFailure("LSC-CNN's batch failed")

    health = tasks.DeviceHealth()
    entry = registry.LocatorEntry("centerface", "test", lambda _weights: True,
                                  lambda _weights: _OnnxLocator("CUDAExecutionProvider", None))
    monkeypatch.setitem(registry.REGISTRY, "centerface", entry)
    monkeypatch.setitem(registry.REGISTRY, "lsccnn", registry.LocatorEntry("lsccnn", "test", lambda _weights: True,
                                                                           lambda _weights: FailingLsccnn()))
    monkeypatch.setattr(accelerated, "load_batched_locator", lambda *_args, **_kwargs: FailingLsccnn())
    anonymiser = accelerated.build_anonymiser(Settings(locators=("centerface", "lsccnn")), weights_dir=tmp_path,
                                              on_success=health.succeeded)
    counts = []
    for _ in range(3):  # three jobs, each handed over as _hand_over does
        with pytest.raises(DeviceFailure):
            anonymiser.locate(np.zeros((32, 32, 3), np.uint8))
        counts.append(health.failed())
    assert counts == [1, 2, 3]


class _HungSession:
    """Stands for an ONNX Runtime session on a GPU that stopped answering: a run never returns
    (until the test lets it)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def run(self, names: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.release.wait(30)
        return [np.zeros(1, np.float32)]


def test_an_onnx_run_on_a_hung_gpu_fails_over_within_the_timeout(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """CenterFace runs before LSC-CNN: on a GPU that hangs, its ONNX Runtime call never returns,
    and without a limit of its own every task thread would wait there for ever (LSC-CNN's
    timeout is never reached) while the heartbeat kept the worker in rotation. Every caller,
    those inside a run and those waiting for one, gets a DeviceFailure within the timeout."""
    from anonymiser.locators.onnx_models import Session

    hung = _HungSession()
    locator = _OnnxLocator("CUDAExecutionProvider", None)
    locator._session = Session(hung, gpu_runs=1)  # type: ignore[assignment]
    locator.locate = lambda rgb: (locator._session.run(None, {"x": rgb}), Detections())[1]  # type: ignore[method-assign]
    monkeypatch.setenv("ANON_LSCCNN_TIMEOUT_S", "0.3")
    anonymiser = _gpu_anonymiser(monkeypatch, tmp_path, locator)
    outcomes: list[BaseException | None] = []

    def job() -> None:
        try:
            anonymiser.locate(np.zeros((32, 32, 3), np.uint8))
            outcomes.append(None)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcomes.append(exc)

    threads = [threading.Thread(target=job, daemon=True) for _ in range(3)]  # one runs, two wait
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    waited = time.monotonic() - started
    hung.release.set()
    assert len(outcomes) == 3, "a task thread still waits for the hung GPU"
    assert all(isinstance(o, DeviceFailure) for o in outcomes), outcomes
    assert "no answer within 0.3 s" in str(outcomes[0])
    assert waited < 5


def test_an_onnx_answer_arriving_as_the_wait_runs_out_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait can time out just as the GPU's answer lands: that answer is the call's result,
    not a bare TimeoutError (which a task takes for a bug: a dead letter and an apology)."""
    from concurrent.futures import Future

    from anonymiser.locators import onnx_models

    class LateFuture(Future):  # type: ignore[type-arg]
        """Its first timed wait gives up only once the answer is in: the race, every time."""

        timed_out = False

        def result(self, timeout: float | None = None) -> Any:
            if timeout is not None and not self.timed_out:
                self.timed_out = True
                super().result()  # the answer lands...
                raise TimeoutError()  # ...as the wait gives up
            return super().result(timeout)

    class Answering(_HungSession):
        def run(self, names: object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.ones(1, np.float32)]

    monkeypatch.setattr(onnx_models, "Future", LateFuture)
    session = onnx_models.Session(Answering(), gpu_runs=1, timeout_s=5.0)
    [out] = session.run(None, {"x": np.zeros(1, np.float32)})
    assert out.tolist() == [1.0]
