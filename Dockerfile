# cosmos3-serve for Hopper / Blackwell GPUs.
#   docker build -t cosmos3-serve .
#   docker run --gpus all --ipc host -p 8000:8000 -v /path/to/Cosmos3-Nano:/models/cosmos3:ro \
#     -e NIM_API_KEY=... cosmos3-serve
# The base image carries CUDA, torch, the real torchvision and vLLM (0.26 to 0.33 are supported), pinned by version.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.26.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/cosmos3-serve
COPY pyproject.toml README.md ./
COPY server ./server
COPY model_executor ./model_executor
COPY sampling ./sampling
COPY quant ./quant
COPY deploy/docker/requirements.txt ./deploy/docker/requirements.txt
RUN python3 -m pip install --no-cache-dir --requirement deploy/docker/requirements.txt \
 && python3 -m pip install --no-cache-dir --no-deps nvidia-modelopt==0.47.0 \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin cosmos3

# NIM-style settings (docs/api.md); flags given to `docker run ... IMAGE --flag` override them.
ENV HF_HUB_OFFLINE=1 \
    NIM_MODEL_PATH=/models/cosmos3 \
    NIM_HOST=0.0.0.0 \
    NIM_SERVER_PORT=8000 \
    NIM_PRECISION=auto \
    NIM_TENSOR_PARALLEL_SIZE=1
USER 10001
EXPOSE 8000
# Loading Nano and measuring its generator takes minutes: the first checks only count after the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['NIM_SERVER_PORT']}/v1/health/ready\", timeout=4)"]
ENTRYPOINT ["cosmos3-serve", "serve"]
