# Edit-Your-Motion web app on one NVIDIA GPU.
#   docker build -t eym .            (or: podman build / buildah bud -t eym .)
#   docker run --gpus all -p 7860:7860 -v eym-cache:/home/eym/.cache eym
# The torch wheels bring their own CUDA runtime, so the base is plain Python; the host needs only
# the NVIDIA driver (and the container toolkit). pre-requirements.txt picks the CUDA 12.8 torch
# build, which runs on drivers >= 570 (PyPI's torch 2.14.1 is a CUDA 13 build: drivers >= 580).
# Weights are not baked in: mount a Hugging Face cache (or set EYM_MODEL / EYM_CONTROLNET to
# folders you mount). Without weights the app starts on the tiny demo model and says so.
FROM docker.io/library/python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libgl/libglib for OpenCV and mediapipe.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 eym

# Dependencies first, so code changes do not reinstall them. Runtime set only: no test tools.
COPY pre-requirements.txt requirements.txt /tmp/
RUN pip install -r /tmp/pre-requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/pre-requirements.txt /tmp/requirements.txt

# The code belongs to root and is read-only for the user the app runs as; it runs from /app
# without being pip-installed. Only outputs and caches are writable.
WORKDIR /app
COPY . .
RUN mkdir -p /app/outputs /home/eym/.cache \
    && chown -R eym:eym /app/outputs /home/eym/.cache

USER eym
ENV HOME=/home/eym \
    EYM_HOME=/home/eym/.cache/eym \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    EYM_OUTPUTS=/app/outputs \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GRADIO_SERVER_PORT', '7860'), timeout=4)"]
CMD ["python", "app.py"]
