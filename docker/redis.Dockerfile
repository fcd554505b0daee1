# Redis for the compose topology where Docker Hub's redis:7-alpine is out of reach: Debian's
# redis-server on a local Debian base (scripts/image_check.sh builds it as localhost/ptserve-redis).
#   podman build -f docker/redis.Dockerfile -t localhost/ptserve-redis:bookworm \
#       --build-arg BASE_IMAGE=localhost/ptserve-base:bookworm .
#   REDIS_IMAGE=localhost/ptserve-redis:bookworm podman-compose up -d
# Behaves like the official image where compose relies on it: `redis-server ARGS` as the command,
# /data as the working directory (the append-only file), redis-cli for the health check, and
# protected mode off when no configuration file is given (other containers connect over the network).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
COPY docker/redis-entrypoint.sh /usr/local/bin/redis-entrypoint
USER redis
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
