# nginx for the compose topology where Docker Hub's nginx:1.27-alpine is out of reach: Debian's nginx
# on a local Debian base (scripts/image_check.sh builds it as localhost/ptserve-nginx).
#   podman build -f docker/nginx.Dockerfile -t localhost/ptserve-nginx:bookworm \
#       --build-arg BASE_IMAGE=localhost/ptserve-base:bookworm .
#   NGINX_IMAGE=localhost/ptserve-nginx:bookworm podman-compose up -d
# docker/nginx.conf needs nginx >= 1.27.3 (`resolve` on an upstream server): bookworm has 1.22, so
# nginx comes from NGINX_SUITE (sid; empty: the base's own suite). wget is the health check's client.
# The entrypoint does what the official image's does for compose: it sources executable
# /docker-entrypoint.d/*.envsh files (compose mounts docker/nginx-resolver.envsh there, which sets
# NGINX_LOCAL_RESOLVERS), then writes templates in /etc/nginx/templates to NGINX_ENVSUBST_OUTPUT_DIR
# with the environment's variables substituted.
# check-valid-until=no: mirrors that are frozen snapshots serve an expired sid Release file.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG NGINX_SUITE=sid
# The whole image moves to NGINX_SUITE (a partial upgrade of bookworm trips over the t64 transition).
RUN if [ -n "$NGINX_SUITE" ]; then \
        rm -f /etc/apt/sources.list.d/* \
        && echo "deb [check-valid-until=no] http://deb.debian.org/debian $NGINX_SUITE main" > /etc/apt/sources.list \
        && apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get full-upgrade -y --no-install-recommends; \
    fi \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx wget gettext-base \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
    && nginx -v
COPY docker/nginx-entrypoint.sh /usr/local/bin/nginx-entrypoint
EXPOSE 8080
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/usr/local/bin/nginx-entrypoint"]
CMD ["nginx", "-g", "daemon off;"]
