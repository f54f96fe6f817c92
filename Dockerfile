# Edit-Your-Motion web app on one NVIDIA GPU.
#   docker build -t eym .
#   docker run --gpus all -p 7860:7860 -v eym-cache:/home/eym/.cache eym
# Weights are not baked in: mount a Hugging Face cache (or set EYM_MODEL / EYM_CONTROLNET to
# folders you mount). Without weights the app starts on the tiny demo model and says so.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 from the deadsnakes PPA; libgl/libglib for OpenCV and mediapipe.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv libgl1 libglib2.0-0 ca-certificates \
    && apt-get purge -y software-properties-common gpg-agent \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 eym
WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt pyproject.toml README.md ./
COPY eym/__init__.py eym/__init__.py
RUN grep -v '^-e ' requirements.txt > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY --chown=eym:eym . .
RUN pip install --no-deps -e . \
    && mkdir -p /app/outputs /home/eym/.cache \
    && chown -R eym:eym /app/outputs /home/eym/.cache

USER eym
ENV HOME=/home/eym \
    EYM_HOME=/home/eym/.cache/eym \
    EYM_HOST=0.0.0.0 \
    EYM_PORT=7860 \
    EYM_OUTPUTS=/app/outputs \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/healthz', timeout=4)"]
CMD ["python", "app.py"]
