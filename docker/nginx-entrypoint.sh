#!/bin/sh
# The parts of the official nginx image's entrypoint that docker-compose.yml relies on: executable
# /docker-entrypoint.d/*.envsh files are sourced (compose mounts docker/nginx-resolver.envsh there),
# then templates in /etc/nginx/templates are written to NGINX_ENVSUBST_OUTPUT_DIR with the
# environment's variables substituted (nginx's own lower-case $variables are left alone).
set -e
for script in /docker-entrypoint.d/*.envsh; do
    [ -x "$script" ] || continue
    . "$script"
done
out=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
defined=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
for template in /etc/nginx/templates/*.template; do
    [ -f "$template" ] || continue
    target="$out/$(basename "$template" .template)"
    envsubst "$defined" <"$template" >"$target"
    echo "$0: $template -> $target"
done
exec "$@"
