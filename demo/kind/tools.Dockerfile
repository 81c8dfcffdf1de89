# The demo workload image: can-utils (cangen, candump) on Debian.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends can-utils procps \
    && rm -rf /var/lib/apt/lists/*
