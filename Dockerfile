# The braid image: one image for the router, prefill and decode nodes; its
# entrypoint is the `braid` CLI (`braid router serve --config ...`).
#
#   CPU (default, the torch CPU wheels):
#     docker build -t braid:0.1.0-cpu .
#   NVIDIA CUDA (PyPI's default Linux torch wheel bundles CUDA; gcc lets
#   Triton build its launcher at run time):
#     docker build -t braid:0.1.0-cuda --build-arg TORCH_INDEX_URL= --build-arg APT_PACKAGES=gcc .
#   Ascend NPU (a CANN base image matching the torch-npu release, and the
#   `npu` extra, torch-npu):
#     docker build -t braid:0.1.0-npu \
#       --build-arg BASE_IMAGE=quay.io/ascend/cann:8.5.0-910b-ubuntu22.04-py3.11 \
#       --build-arg EXTRAS=npu .
#
# EXTRAS takes a comma-separated list of the optional extras in
# pyproject.toml (npu, rdma).
#
# Offline (no registry, no PyTorch index): scripts/build-image.sh makes a
# Debian base locally (mmdebstrap) and fills wheels/ with the CPU torch wheel
# and every dependency, then builds with
#   --build-arg BASE_IMAGE=localhost/braid-base:bookworm
#   --build-arg TORCH_INDEX_URL= --build-arg PIP_EXTRA_ARGS=--no-index
# wheels/ is bind-mounted for the install only (no layer keeps the wheels);
# it holds just a README otherwise, and pip then uses the indexes as before.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG EXTRAS=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APT_PACKAGES=""
ARG PIP_EXTRA_ARGS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BRAID_HOME=/var/lib/braid

RUN if [ -n "${APT_PACKAGES}" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${APT_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY cluster ./cluster
COPY decode_node ./decode_node
COPY discovery ./discovery
COPY engine ./engine
COPY kernels ./kernels
COPY kv_transfer ./kv_transfer
COPY node ./node
COPY planner ./planner
COPY prefill_node ./prefill_node
COPY proto ./proto
COPY router ./router
COPY tokenizer ./tokenizer
RUN --mount=type=bind,source=wheels,target=/tmp/wheels \
    python3 -m pip install --find-links /tmp/wheels ${PIP_EXTRA_ARGS} \
        ${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"} ".${EXTRAS:+[${EXTRAS}]}" \
    && cd / && rm -rf /src /root/.cache

# Non-root, numeric so that Kubernetes' runAsNonRoot can verify it. The
# manifests run with a read-only root filesystem: BRAID_HOME (caches, the
# embedded tiny model) and /tmp are writable volumes there.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/braid --shell /usr/sbin/nologin braid \
    && mkdir -p /var/lib/braid \
    && chown 10001:10001 /var/lib/braid
USER 10001:10001
WORKDIR /var/lib/braid

ENTRYPOINT ["braid"]
CMD ["--help"]
