#!/bin/sh
# The parts of the official nginx image's entrypoint that docker-compose.yml relies on.
set -e
if [ -n "${NGINX_ENTRYPOINT_LOCAL_RESOLVERS:-}" ]; then
    NGINX_LOCAL_RESOLVERS=$(awk '$1 == "nameserver" { a = $2; if (a ~ /:/) a = "[" a "]"; printf "%s%s", s, a; s = " " }' /etc/resolv.conf)
    export NGINX_LOCAL_RESOLVERS
fi
out=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
defined=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
for template in /etc/nginx/templates/*.template; do
    [ -f "$template" ] || continue
    target="$out/$(basename "$template" .template)"
    envsubst "$defined" <"$template" >"$target"
    echo "$0: $template -> $target"
done
exec "$@"
