# syntax=docker/dockerfile:1
# SHARP (one photo in, a 3D Gaussian splat .ply out) as a RunPod serverless worker.
#
#   docker build -t sharp-runpod .                            weights fetched at first start
#   docker build --build-arg BAKE_WEIGHTS=1 -t sharp-runpod .   weights in the image: private
#                                                               images only, see the README
#   docker build --build-arg TORCH_TENSORRT_VERSION= -t sharp-runpod:no-trt .
#                                                             no TensorRT (eager or CPU serving)
#
# BASE_IMAGE may be any image whose Python has torch installed: a system Python marked
# externally managed (PEP 668, `python3` only) or a conda one. torch-tensorrt must match the
# base's torch exactly: both 2.13, both built for CUDA 13.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_TENSORRT_VERSION=2.13.0
ARG BAKE_WEIGHTS=
ARG CHECKPOINT_URL=https://ml-site.cdn-apple.com/models/sharp/sharp_2572gikvuh.pt
ARG LICENSE_MODEL_URL=https://raw.githubusercontent.com/apple/ml-sharp/main/LICENSE_MODEL

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/etc/pip-constraints.txt

WORKDIR /app

# Everything this image installs goes into a virtual environment that also sees the base's
# packages: the base's site-packages stay as they are (PEP 668 refuses changes to a system
# Python; a conda base is left alone too), and the base's CUDA torch is the one imported. The
# base's pip runs it; the constraint pins the base's own torch build, so that no install
# swaps it for another. From here on `python3` is the environment's.
RUN python3 -m venv --system-site-packages --without-pip /opt/venv \
    && python3 -c "import torch; print(f'torch=={torch.__version__}')" > /etc/pip-constraints.txt
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch-tensorrt comes from PyPI with its TensorRT runtime (tensorrt-cu13): no NVIDIA index.
# An empty version leaves it out (1+ GB less); the worker then serves without TensorRT.
RUN if [ -n "${TORCH_TENSORRT_VERSION}" ]; then \
      python3 -m pip install "torch-tensorrt==${TORCH_TENSORRT_VERSION}" ; \
    else echo "TORCH_TENSORRT_VERSION is empty: no torch-tensorrt in this image." ; fi

# Before the sources, so that a code change does not download 2.8 GB again. Apple's model
# licence allows redistribution only with its text and an attribution notice, so baked
# weights ship with both. BAKE_WEIGHTS unset: the worker downloads the weights at first
# start into its cache (on the network volume when one is mounted).
RUN case "${BAKE_WEIGHTS}" in \
      "") echo "Weights not baked in; the worker downloads them at first start." ;; \
      1) mkdir -p /opt/sharp/weights \
         && python3 -c "import sys, urllib.request as r; r.urlretrieve(sys.argv[1], sys.argv[2])" \
              "${CHECKPOINT_URL}" /opt/sharp/weights/sharp_2572gikvuh.pt \
         && python3 -c "import sys, urllib.request as r; r.urlretrieve(sys.argv[1], sys.argv[2])" \
              "${LICENSE_MODEL_URL}" /opt/sharp/weights/LICENSE_MODEL \
         && grep -q "Apple Machine Learning Research Model" /opt/sharp/weights/LICENSE_MODEL \
         && echo "Apple Machine Learning Research Model is licensed under the Apple Machine Learning Research Model License Agreement." \
              > /opt/sharp/weights/NOTICE ;; \
      *) echo "BAKE_WEIGHTS must be 1 or unset, got '${BAKE_WEIGHTS}'" >&2; exit 1 ;; \
    esac

# Empty (the worker's default: Apple's URL, cached) unless the weights were baked in.
ENV SHARP_CHECKPOINT=${BAKE_WEIGHTS:+/opt/sharp/weights/sharp_2572gikvuh.pt}

COPY . .

# The project pins no versions of its own here: pyproject.toml is the one place for them.
# The check after it fails the build if torch was installed into the environment after all.
# hadolint ignore=DL3013
RUN python3 -m pip install ".[worker]" \
    && python3 -c "import torch; assert not torch.__file__.startswith('/opt/venv/'), torch.__file__"

# The build tool, on the baked weights only, so that the build never downloads them behind the
# licence's back (and runs on any builder: no BuildKit-only flags). On a GPU builder it compiles
# and validates the engine into the image; on a builder without one (the usual case) there is
# nothing a GPU worker could load, and it says so and exits 0. The worker then builds its
# engine in a child process at first start, or finds the one `sharp-runpod build-engine` put on
# the network volume (see the README).
ENV SHARP_PREBUILT_ENGINE_DIR=/opt/sharp/engines
RUN if [ -n "${SHARP_CHECKPOINT}" ]; then \
      python3 export/build_engine.py --output-dir /opt/sharp/engines ; \
    else echo "No weights in the image: the worker builds its engine at first start." ; fi

# Optional: Apple's own package at the pinned commit, so that `sharp-runpod build-engine
# --apple-parity require` on a GPU pod can compare both implementations on the real weights.
ARG APPLE_SHARP=
# hadolint ignore=DL3013
RUN if [ -n "${APPLE_SHARP}" ]; then \
      python3 -m pip install --no-cache-dir --no-deps \
        "sharp @ https://github.com/apple/ml-sharp/archive/1eaa046834b81852261262b41b0919f5c1efdd2e.tar.gz" \
      && python3 -m pip install --no-cache-dir "timm==1.0.20" "plyfile==1.1.2" scipy ; \
    fi

# Outside RunPod (no RUNPOD_WEBHOOK_GET_JOB), `docker run -p 8000:8000` serves the RunPod SDK's
# local API on 0.0.0.0:8000; SHARP_LOCAL_API=0 runs test_input.json once and exits instead. On
# RunPod the worker takes the endpoint's jobs whatever this says.
ENV SHARP_LOCAL_API=1

# No USER: RunPod mounts network volumes owned by root, and the weights cache lives there.
CMD ["python3", "-u", "-m", "handler"]
