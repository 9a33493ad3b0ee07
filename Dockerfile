# The same environment the set-up scripts build: Python 3.11, CPU torch, qflow with dev extras.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make git file g++-aarch64-linux-gnu \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /qflow
COPY . .
# Outside the development machines the CPU build of torch comes from PyTorch's CPU index.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN scripts/setup.sh dev
ENV PATH=/qflow/.venv/bin:$PATH

CMD ["scripts/test.sh"]
