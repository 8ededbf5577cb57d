# Two images from one file:
#   docker build --target api    -t atelier-api .     (no torch: starts fast, runs anywhere)
#   docker build --target worker -t atelier-worker .  (CUDA runtime + torch for GPU workers)

FROM python:3.11-slim AS api
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock ./
# The API needs no torch/diffusers: install the lock without them. It keeps safetensors and numpy, with which
# api/adapter_files.py checks imported adapters, and tokenizers, with which api/text_checks.py counts a prompt's
# tokens (tests/service/test_deployment_files.py checks this filter).
RUN grep -viE '^(torch|diffusers|transformers|peft|accelerate|huggingface.hub|nvidia|triton|sympy|networkx|mpmath)[=_ -]' requirements.lock > requirements.api \
 && pip install --no-cache-dir -r requirements.api
COPY alembic.ini ./
COPY api ./api
COPY contract ./contract
COPY store ./store
COPY worker/__init__.py worker/celery_app.py ./worker/
COPY migrations ./migrations
# The model folders are not in the image: mount them at /models (docker-compose.yml mounts ./zoo).
ENV ATELIER_MODELS_DIR=/models
EXPOSE 8000
CMD ["sh", "-c", "python -c 'from store.migrate import upgrade; from store.settings import get_settings; upgrade(get_settings().database_url)' && uvicorn api.main:app_factory --factory --host 0.0.0.0 --port ${PORT:-8000}"]

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS worker
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* && ln -sf /usr/bin/python3.11 /usr/local/bin/python
COPY requirements.lock ./
# On the GPU image torch comes from the CUDA wheel index at the same version as the lock.
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu124 torch==2.13.0 \
 && grep -v '^torch==' requirements.lock > requirements.worker \
 && python -m pip install --no-cache-dir -r requirements.worker
# xformers for ATELIER_ATTENTION=xformers, on the GPU image only (requirements.lock, which the tests and the CPU use,
# does not have it). Pinned, and without its dependencies, so that it cannot replace the CUDA torch above; 0.0.35
# asks for torch>=2.10. A worker started with ATELIER_ATTENTION=xformers where it does not import refuses to start.
RUN python -m pip install --no-cache-dir --no-deps xformers==0.0.35
COPY . .
ENV ATELIER_MODELS_DIR=/models ATELIER_DEVICE=cuda ATELIER_DTYPE=fp16 ATELIER_ATTENTION=sdpa
CMD ["python", "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "inference", "-c", "1", "--pool", "prefork", "--loglevel", "INFO"]
