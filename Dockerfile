# Study workers and the dashboard: CUDA-enabled PyTorch from the base image, this project on top.
# torch and torchvision come with the base image; `pip install .` keeps them (setup.cfg's ranges
# admit them) and adds Optuna, optuna-dashboard, psycopg2, W&B.
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY . .
RUN pip install . \
 && useradd --create-home --uid 1000 pcvit \
 && mkdir -p /artifacts /app/data /app/runs \
 && chown pcvit /artifacts /app/data /app/runs
# Named volumes mounted on these folders start out owned by pcvit, so the workers need no root.

# The image has no .git: the code version recorded with every trial comes from the build, e.g.
# PCVIT_CODE_VERSION=$(git describe --always --dirty) docker compose build
ARG PCVIT_CODE_VERSION=unknown
ENV PCVIT_CODE_VERSION=${PCVIT_CODE_VERSION}
USER pcvit
CMD ["pcvit-worker", "--help"]
