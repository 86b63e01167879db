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
#   docker build -t identification .                                   (CUDA 13: Turing and newer)
#   docker build --build-arg CUDA_LINE=cuda12 -t identification:cuda12 .
#       (Pascal and Volta, e.g. a GeForce MX230/MX250: onnxruntime-gpu's CUDA 12
#       line with cuDNN below 9.11; `scripts/setup.sh --dry-run` on the host names
#       the line for its card; the lines are in models/cuda_builds.py)
#   docker run --rm --gpus all identification     # runs `ident doctor`
#
# Models are not baked in: mount the folder at /models (read-only).

FROM python:3.11-slim-bookworm

# cuda13, cuda12, cuda12-sm52 (Maxwell 5.2) or cpu: the same choice scripts/setup.sh
# makes from nvidia-smi on a host, made here by name since a build sees no GPU.
ARG CUDA_LINE=cuda13

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    IDENT_MODELS_DIR=/models

COPY . /src
# One resolve for the project and the line's pinned onnxruntime-gpu and NVIDIA
# libraries, under that line's constraints file (every version as the tests
# last passed with). The check after it fails the build if the CPU-only
# onnxruntime slipped in beside onnxruntime-gpu (they share one module and the
# CPU build wins) or the CUDA EP is missing from the build.
RUN cd /src \
 && python -m models.cuda_builds line "${CUDA_LINE}" --json >/tmp/line.json \
 && constraints=$(python -c "import json; print(json.load(open('/tmp/line.json'))['constraints'])") \
 && python -c "import json; print('\n'.join(json.load(open('/tmp/line.json'))['packages']))" >/tmp/packages.txt \
 && pip install -c "/src/${constraints}" "/src[worker]" -r /tmp/packages.txt \
 && python -c "import importlib.metadata as m, onnxruntime as o; \
names = {(d.metadata['Name'] or '').lower() for d in m.distributions()}; \
assert 'onnxruntime' not in names, 'onnxruntime (CPU) is installed beside onnxruntime-gpu'; \
assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers(); \
print('onnxruntime-gpu', o.__version__, o.get_available_providers())" \
 && cd / && rm -rf /src /tmp/line.json /tmp/packages.txt

RUN useradd --system --uid 10001 --create-home --home-dir /home/ident --shell /usr/sbin/nologin ident \
 && mkdir -p /models && chown ident /models
USER ident
WORKDIR /home/ident

CMD ["ident", "doctor"]
