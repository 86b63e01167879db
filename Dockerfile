# One image for the vision worker, the audio worker and Flower, on GPU or CPU hosts.
#
# Base: a slim Python image plus onnxruntime-gpu[cuda,cudnn], not an
# nvidia/cuda:*-cudnn-runtime image. The [cuda,cudnn] extras install the CUDA
# and cuDNN user-space libraries as nvidia-* wheels that pip matches to the
# onnxruntime-gpu build (CUDA 13 for 1.27 and later), and onnxruntime preloads
# them, so there is no second place where CUDA versions must be kept in step.
# The driver's libcuda is never in an image: the NVIDIA Container Toolkit
# mounts the host's at run time (compose.gpu.yml reserves the GPU). A CUDA base
# image would also bring Ubuntu 24.04's Python 3.12 instead of the 3.11 this
# project targets, and the same libraries a second time.
#
#   docker build -t identification .
#   docker build --build-arg ORT_GPU_SPEC="onnxruntime-gpu[cuda,cudnn]<1.27" -t identification:cuda12 .
#       (the CUDA 12 line, for Pascal/Volta GPUs such as the GeForce MX230/MX250)
#   docker run --rm --gpus all identification     # runs `ident doctor`
#
# Models are not baked in: mount the folder at /models (read-only).

FROM python:3.11-slim-bookworm

ARG ORT_GPU_SPEC="onnxruntime-gpu[cuda,cudnn]>=1.27"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    IDENT_MODELS_DIR=/models

COPY . /src
# One resolve for the project and the GPU runtime, so pip cannot pick an
# onnxruntime-gpu that the worker extra and ORT_GPU_SPEC disagree on. The check
# after it fails the build if the CPU-only onnxruntime slipped in beside
# onnxruntime-gpu (they share one module and the CPU build wins) or the CUDA EP
# is missing from the build. Every other package is held at the version the
# tests last passed with (constraints.txt); onnxruntime-gpu is left to
# ORT_GPU_SPEC, so the CUDA 12 line stays one build argument away.
RUN grep -v '^onnxruntime-gpu==' /src/constraints.txt >/tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt "/src[worker]" "${ORT_GPU_SPEC}" \
 && python -c "import importlib.metadata as m, onnxruntime as o; \
names = {(d.metadata['Name'] or '').lower() for d in m.distributions()}; \
assert 'onnxruntime' not in names, 'onnxruntime (CPU) is installed beside onnxruntime-gpu'; \
assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers(); \
print('onnxruntime-gpu', o.__version__, 'for CUDA', o.capi.build_and_package_info.cuda_version)" \
 && rm -rf /src /tmp/constraints.txt

RUN useradd --system --uid 10001 --create-home --home-dir /home/ident --shell /usr/sbin/nologin ident \
 && mkdir -p /models && chown ident /models
USER ident
WORKDIR /home/ident

CMD ["ident", "doctor"]
