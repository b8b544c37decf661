# kernelscope image: the API (`kernelscope serve`) and the stream worker (`kernelscope worker`).
#
# torch is installed first, pinned, from the index given by the TORCH_INDEX_URL build
# argument, so that `pip install .` afterwards finds it satisfied and never pulls another
# build.  Leave TORCH_INDEX_URL empty to use pip's configured default index (on Linux x86_64
# that is the large CUDA-enabled build, what the GPU worker wants); set it to PyTorch's
# CPU-only wheel index for a small CPU image.  docs/deployment.md explains both.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# A layer of its own: changing the project's code does not re-download torch.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

COPY pyproject.toml README.md LICENSE ./
COPY sketch ./sketch
COPY service ./service
COPY clients ./clients
RUN pip install .

# Run unprivileged; the embedded mode (no REDIS_URL) keeps its data under /data.
RUN useradd --create-home --uid 10001 kernelscope \
    && mkdir -p /data \
    && chown kernelscope:kernelscope /data
USER kernelscope
ENV KERNELSCOPE_DATA_DIR=/data
VOLUME ["/data"]

EXPOSE 8000
CMD ["kernelscope", "serve", "--host", "0.0.0.0", "--port", "8000"]
