# The pipeline in a CUDA container: build once, then run any make target with the data and outputs as volumes.
#   docker build -t pneumothorax --build-arg TORCH=cu128 .
#   docker run --gpus all --shm-size 8g -v /data/siim:/data:ro -v $PWD/models:/app/models \
#     -v $PWD/processed:/app/data/processed -v $PWD/submissions:/app/submissions \
#     pneumothorax make submit DATA_DIR=/data EXP=2st_exp5
# (docs/install.md: which TORCH build for which NVIDIA driver; the base image's CUDA only needs to be no newer.)
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH=cu128
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 QUIET=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev make bash gcc \
    libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt pyproject.toml README.md Makefile ./
COPY src ./src
RUN make install TORCH=${TORCH} && rm -rf /root/.cache/pip
COPY . .
RUN touch .venv/.installed
VOLUME ["/data", "/app/models", "/app/data/processed", "/app/submissions", "/app/predictions"]
CMD ["make", "help"]
