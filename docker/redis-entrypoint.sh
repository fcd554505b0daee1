#!/bin/sh
# As the official redis image: arguments starting with '-' are redis-server's; without a configuration
# file protected mode goes off, since clients come from other containers.
set -e
case "$1" in -*) set -- redis-server "$@" ;; esac
if [ "$1" = redis-server ]; then
    case "$2" in *.conf) ;; *) set -- "$@" --protected-mode no ;; esac
fi
exec "$@"
