# cosmos3-serve for Hopper / Blackwell GPUs.
#   docker build -t cosmos3-serve .
#   docker run --gpus all -p 8000:8000 -v /path/to/Cosmos3-Nano:/models/cosmos3 -e NIM_PRECISION=fp8 cosmos3-serve
# The base image carries CUDA, torch, the real torchvision and vLLM (0.26 to 0.33 are supported).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.26.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/cosmos3-serve
COPY pyproject.toml README.md ./
COPY server ./server
COPY model_executor ./model_executor
COPY sampling ./sampling
COPY quant ./quant
RUN python3 -m pip install --no-cache-dir '.[gpu,quantize]' \
 && python3 -m pip install --no-cache-dir --no-deps nvidia-modelopt==0.47.0

# NIM-style settings (docs/api.md); flags given to `docker run ... IMAGE --flag` override them.
ENV HF_HUB_OFFLINE=1 \
    NIM_MODEL_PATH=/models/cosmos3 \
    NIM_HOST=0.0.0.0 \
    NIM_SERVER_PORT=8000 \
    NIM_PRECISION=auto \
    NIM_TENSOR_PARALLEL_SIZE=1
EXPOSE 8000
ENTRYPOINT ["cosmos3-serve", "serve"]
