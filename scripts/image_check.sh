#!/usr/bin/env bash
# Build ptserve's image with podman from a local Debian base, run it, classify; then bring the compose
# topology up with podman-compose (local Redis and nginx images) and run the topology flow through nginx.
# Takes minutes (the first run: a debootstrap and a full image build), so it is not part of CI.
#
#   sudo bash scripts/image_check.sh                  # everything; prints PASS/FAIL lines, exits 1 on a FAIL
#   sudo bash scripts/image_check.sh --image-only     # build and check the image, no compose topology
#
# Needs root, Debian (apt) and access to a Debian mirror and PyPI; no Docker Hub, Hugging Face or
# download.pytorch.org: torch comes from docker/wheels (TORCH_WHEEL, a CPU wheel copied there if absent).
# Safe to run again: the base image, tools and image layers are cached.
#
# Environment: PTSERVE_IMAGE_WORK (cache directory, /var/tmp/ptserve-image), TORCH_WHEEL, BASE_IMAGE
# (skip the debootstrap base and build on this image instead), TORCH_INDEX_URL (default empty: torch
# from docker/wheels), PTSERVE_HTTP_PORT (nginx on the host, 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${PTSERVE_IMAGE_WORK:-/var/tmp/ptserve-image}
SUITE=bookworm
LOCAL_BASE=localhost/ptserve-base:$SUITE
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
mkdir -p "$WORK"

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
elapsed() { echo $(($(date +%s) - $1)); }

# -- tools: podman (runc), debootstrap, podman-compose -------------------------------------------------
step "tools"
missing=()
for tool in podman:podman runc:runc newuidmap:uidmap fuse-overlayfs:fuse-overlayfs \
  slirp4netns:slirp4netns debootstrap:debootstrap; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$WORK/apt.log" \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$WORK/apt.log"; }
fi
if [ ! -x "$WORK/tools/bin/podman-compose" ]; then
  python3 -m venv "$WORK/tools"
  "$WORK/tools/bin/pip" install -q podman-compose 2>&1 | { grep -v "neither a file nor a directory" || true; }
fi
export PATH="$WORK/tools/bin:$PATH"

# runc, not crun (crun fails here on rlimits/cgroups), and limits no higher than this machine's hard
# ones: without CAP_SYS_RESOURCE runc cannot set podman's default nofile/nproc. CONTAINERS_CONF reaches
# every podman call, podman-compose's included.
limit() { # half the hard limit (an equal one is refused too), at most 16384
  local hard=$1
  if [ "$hard" = unlimited ] || [ $((hard / 2)) -gt 16384 ]; then echo 16384; else echo $((hard / 2)); fi
}
nofile=$(limit "$(ulimit -Hn)")
nproc=$(limit "$(ulimit -Hu)")
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"
podman --version
podman-compose --version 2>/dev/null | head -1

# -- the local base: debootstrap minbase + python3 + this machine's CA certificates --------------------
if [ "$BASE_IMAGE" = "$LOCAL_BASE" ] && ! podman image exists "$LOCAL_BASE"; then
  step "base image $LOCAL_BASE (debootstrap)"
  t0=$(date +%s)
  rootfs="$WORK/rootfs-$SUITE"
  if [ ! -x "$rootfs/usr/bin/python3" ]; then
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "$SUITE" "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  fi
  # CAs this machine trusts (e.g. a TLS-inspecting proxy in front of PyPI) are trusted in the image too.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import -q --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" >/dev/null
  echo "base image: $(elapsed "$t0") s"
fi

# -- torch for the offline build ------------------------------------------------------------------------
if [ -z "$TORCH_INDEX_URL" ] && ! compgen -G "docker/wheels/torch-*.whl" >/dev/null; then
  cp "$TORCH_WHEEL" docker/wheels/
fi

exec python3 "$REPO/scripts/image_check.py" --base-image "$BASE_IMAGE" --torch-index-url "$TORCH_INDEX_URL" "$@"
