# mathforge GPU worker: NVIDIA's TensorRT-LLM release container with mathforge installed beside it.
#
#   docker build -f infra/gpu-worker.Dockerfile -t mathforge-gpu-worker:trtllm-1.1.0rc0 .
#
# Base image, pinned: TensorRT-LLM 1.1.0rc0 is the release the reference recipe (NeMo-Skills' AIMO-2
# inference tutorial) built and measured FP8 + ReDrafter engines with (reference trtllm_redrafter.md §0,
# §8.1). 1.1.x and 1.2.x still have the TensorRT engine flow (trtllm-build, examples/redrafter); 1.3 removed
# it, so a newer tag cannot build the fp8+redrafter variant. To move to another 1.1/1.2 release, change
# TRTLLM_VERSION here AND engine.trtllm.version (+ image) in the preset: the commands are generated for it,
# and a worker refuses to run them for a release it does not have.
#
# The container's own Python keeps TensorRT-LLM and its pinned transformers; mathforge (which needs
# transformers 5) lives in a virtualenv that sees the container's CUDA PyTorch (--system-site-packages) but
# shadows the rest. TensorRT-LLM's tools (`python3 examples/...`, trtllm-build, trtllm-serve) stay first on
# PATH; `mathforge` and `prefect` come from the venv (appended to PATH).
#
# Run a worker on an H100 host (docs/trtllm.md has the whole procedure):
#   docker run -d --gpus all --ipc host --ulimit memlock=-1 --ulimit stack=67108864 --network host \
#     -e PREFECT_API_URL=http://prefect-server:4200/api -e MATHFORGE_GPU_HOST=$(hostname) \
#     -e MATHFORGE_HOME=/shared/mathforge -v /shared/mathforge:/shared/mathforge \
#     -v /shared/huggingface:/root/.cache/huggingface \
#     mathforge-gpu-worker:trtllm-1.1.0rc0 prefect worker start --pool gpu-h100 --name "$(hostname)"
ARG TRTLLM_VERSION=1.1.0rc0
FROM nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_VERSION}
ARG TRTLLM_VERSION

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    TOKENIZERS_PARALLELISM=false

# The examples this image's TensorRT-LLM ships: the scripts the generated commands call.
RUN test -f /app/tensorrt_llm/examples/quantization/quantize.py \
 && test -f /app/tensorrt_llm/examples/redrafter/convert_checkpoint.py \
 && test -f /app/tensorrt_llm/examples/models/core/qwen/convert_checkpoint.py \
 && command -v trtllm-build && command -v trtllm-serve \
 && python3 -c "import importlib.metadata as m; v = m.version('tensorrt_llm'); print(v); assert v.startswith('${TRTLLM_VERSION}'), v"

WORKDIR /opt/mathforge
COPY pyproject.toml README.md prefect.yaml ./
COPY mathforge ./mathforge
COPY artifacts ./artifacts
COPY flows ./flows
COPY tasks ./tasks
COPY configs ./configs

# PIP_CONSTRAINT is cleared: NGC images pin their own packages through it, which would refuse transformers 5
# in the venv (the system site keeps its pins untouched).
RUN python3 -m venv --system-site-packages /opt/mathforge/venv \
 && PIP_CONSTRAINT= /opt/mathforge/venv/bin/pip install -e . \
 && /opt/mathforge/venv/bin/python -c "import torch, transformers, prefect, mathforge; print(torch.__version__, transformers.__version__, prefect.__version__)" \
 && python3 -c "import importlib.metadata as m; assert m.version('tensorrt_llm').startswith('${TRTLLM_VERSION}')"

ENV PATH="${PATH}:/opt/mathforge/venv/bin" \
    MATHFORGE_HOME=/shared/mathforge

CMD ["prefect", "worker", "start", "--pool", "gpu-h100", "--install-policy", "never"]
