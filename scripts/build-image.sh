#!/usr/bin/env bash
# Build braid's CPU image (the one manifests/overlays/cpu runs) from the
# repository's Dockerfile, and print its size.
#
#   bash scripts/build-image.sh            # -> localhost/braid:0.1.0-cpu (buildah/podman), braid:0.1.0-cpu (docker)
#
# Engine: buildah, else podman, else docker (with a daemon); as root with apt
# and none of them, buildah and mmdebstrap are installed. buildah and podman
# run with --storage-driver vfs (no overlay or fuse needed); their images live
# under $BRAID_IMAGE_ROOT when set (containers-storage's --root), else in the
# engine's default (/var/lib/containers/storage as root): about 2.5 GB for the
# base, the image and one working copy.
#
# Base: BASE_IMAGE when set; else the Dockerfile's python:3.11-slim when a
# registry answers; else a Debian rootfs made here with mmdebstrap (python3,
# pip; no compilers, no apt lists), imported as localhost/braid-base:<suite>.
# Torch: the CPU wheel. When a local one is found (pip's find-links) or only
# the PyTorch CPU index has it, wheels/ is filled with it and every dependency
# and the image installs offline (--no-index).
#
#   BRAID_IMAGE          image name (default braid:0.1.0-cpu)
#   BRAID_TORCH_VERSION  torch version (default 2.13.0; pyproject.toml pins the range)
#   BRAID_IMAGE_ENGINE   buildah | podman | docker (default: the first found)
#   BRAID_IMAGE_ROOT     containers-storage root for buildah/podman
#   BRAID_REBUILD_BASE   1: remake the local Debian base even if present
#   BRAID_REBUILD_IMAGE  1: build even when the image's braid.context label says it is up to date
#   BASE_IMAGE           use this base instead (no mmdebstrap)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${BRAID_IMAGE:-braid:0.1.0-cpu}
TORCH_VERSION=${BRAID_TORCH_VERSION:-2.13.0}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
WHEELS=wheels
T_APT=600 T_BASE=900 T_PIP=900 T_BUILD=1800 T_ENGINE=600 T_NET=8

say() { echo "build-image: $*" >&2; }
die() { echo "build-image: error: $*" >&2; exit 1; }

have() { command -v "$1" >/dev/null 2>&1; }

engine_cmd() {  # the engine with its storage flags, under a timeout ($1 s, default T_ENGINE)
  if [ "$ENGINE" = docker ]; then echo "timeout ${1:-$T_ENGINE} docker"
  else echo "timeout ${1:-$T_ENGINE} $ENGINE --storage-driver vfs ${BRAID_IMAGE_ROOT:+--root $BRAID_IMAGE_ROOT}"
  fi
}

apt_install() {
  [ "$(id -u)" = 0 ] && have apt-get || die "need $* (apt-get install $*) and this is not root with apt"
  say "installing $* (apt, up to ${T_APT}s)"
  timeout "$T_APT" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $*" \
    >/dev/null || die "apt-get install $* failed"
}

pick_engine() {
  if [ -n "${BRAID_IMAGE_ENGINE:-}" ]; then ENGINE=$BRAID_IMAGE_ENGINE
  elif have buildah; then ENGINE=buildah
  elif have podman; then ENGINE=podman
  elif have docker && timeout 10 docker info >/dev/null 2>&1; then ENGINE=docker
  else apt_install buildah mmdebstrap; ENGINE=buildah
  fi
  have "$ENGINE" || die "container engine '$ENGINE' not found"
  [ "$ENGINE" = docker ] || [ "$(id -u)" = 0 ] || die "$ENGINE builds here as root only (--storage-driver vfs, --isolation chroot)"
  say "engine: $ENGINE"
}

reachable() { curl -s -o /dev/null --max-time "$T_NET" "$1"; }

image_exists() { $(engine_cmd) image inspect "$1" >/dev/null 2>&1 || $(engine_cmd) inspect --type image "$1" >/dev/null 2>&1; }

# -- torch and the wheelhouse ------------------------------------------------------------

torch_cpu_wheel() {  # fetches torch==VERSION+cpu into wheels/ (local find-links or the PyTorch CPU index)
  local extra=()
  reachable https://download.pytorch.org/whl/cpu/ && extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
  timeout "$T_PIP" "$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$WHEELS" \
    "${extra[@]}" "torch==${TORCH_VERSION}+cpu" >&2 \
    || die "no CPU torch ${TORCH_VERSION} wheel: neither pip's find-links nor download.pytorch.org has it (set BRAID_TORCH_VERSION, or put the wheel in a find-links folder)"
  ls "$WHEELS"/torch-"${TORCH_VERSION}"+cpu-*.whl | head -1
}

project_requirements() {  # dependencies (+ EXTRAS) of pyproject.toml, one a line
  "$PY" - "${EXTRAS:-}" <<'PY'
import sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(p["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    reqs += p["optional-dependencies"][extra]
print("\n".join(r for r in reqs if not r.startswith("torch")))
print("setuptools>=68\nwheel")  # the build backend, for pip's isolated build of braid
PY
}

target_flags() {  # pip's flags for the image's Python $1 where it is not $PY's (x86_64 glibc >= 2.28)
  local p
  [ "$("$PY" -c 'import sys, platform; print("%d.%d" % sys.version_info[:2], platform.machine())')" = "$1 x86_64" ] && return
  echo "--python-version $1 --implementation cp --abi cp${1/./} --abi abi3 --abi none"
  for p in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
    echo "--platform ${p}_x86_64"
  done
}

fill_wheelhouse() {  # sets TORCH_WHEEL and PYTAG; wheels/ gets torch and every dependency
  mkdir -p "$WHEELS"
  local req stamp
  req=$(mktemp); project_requirements >"$req"
  stamp=$( { cat "$req"; echo "$TORCH_VERSION"; } | sha256sum | cut -c1-16)
  TORCH_WHEEL=$(ls "$WHEELS"/torch-"${TORCH_VERSION}"+cpu-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$TORCH_WHEEL" ] && [ "$(cat "$WHEELS/.stamp" 2>/dev/null)" = "$stamp" ]; then
    PYTAG=$(basename "$TORCH_WHEEL" | cut -d- -f3); rm -f "$req"
    say "wheelhouse up to date ($WHEELS)"; return
  fi
  find "$WHEELS" -name '*.whl' -delete; rm -f "$WHEELS/.stamp"   # stale wheels would satisfy pip too
  TORCH_WHEEL=$(torch_cpu_wheel)
  PYTAG=$(basename "$TORCH_WHEEL" | cut -d- -f3)   # cp311
  local ver="${PYTAG:2:1}.${PYTAG:3}"
  say "wheelhouse: $(basename "$TORCH_WHEEL") + $(wc -l <"$req") requirements for Python $ver"
  timeout "$T_PIP" "$PY" -m pip download -q --dest "$WHEELS" --only-binary=:all: $(target_flags "$ver") \
    "$TORCH_WHEEL" -r "$req" >&2 || { rm -f "$req"; die "pip download of the dependencies failed"; }
  rm -f "$req"
  echo "$stamp" >"$WHEELS/.stamp"
}

# -- the local Debian base ---------------------------------------------------------------

suite_for() {  # Debian suite whose python3 is the wheel's
  if [ "$1" = cp311 ]; then echo bookworm
  elif [ "$1" = cp313 ]; then echo trixie
  else die "no Debian suite known for a $1 torch wheel (bookworm has cp311, trixie cp313)"
  fi
}

make_rootfs() {  # $1: suite, $2: output tar
  have mmdebstrap || apt_install mmdebstrap
  say "making a Debian $1 rootfs with mmdebstrap (up to ${T_BASE}s)"
  timeout "$T_BASE" mmdebstrap --quiet --variant=minbase --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='APT::Install-Recommends "false"' \
    --include=python3,python3-pip,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*' \
    "$1" "$2" http://deb.debian.org/debian || die "mmdebstrap failed"
}

import_rootfs() {  # $1: tar, $2: image name
  local e c
  e=$(engine_cmd)
  if [ "$ENGINE" != buildah ]; then
    $e import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/usr/bin/python3"]' "$1" "$2" >/dev/null
    return
  fi
  c=$($e from scratch)
  if ! { $e add "$c" "$1" / >/dev/null \
      && $e config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /usr/bin/python3 "$c" \
      && $e commit -q --rm "$c" "$2" >/dev/null; }; then
    $e rm "$c" >/dev/null 2>&1 || true
    return 1
  fi
}

local_base() {  # echoes the base image name, making it if needed
  local suite name tmp
  suite=$(suite_for "$PYTAG")
  name=localhost/braid-base:$suite
  if [ "${BRAID_REBUILD_BASE:-0}" = 1 ] || ! image_exists "$name"; then
    tmp=$(mktemp -d)
    { make_rootfs "$suite" "$tmp/rootfs.tar" && import_rootfs "$tmp/rootfs.tar" "$name"; } >&2 \
      || { rm -rf "$tmp"; die "could not make the base image $name"; }
    rm -rf "$tmp"
  fi
  echo "$name"
}

# -- the image ---------------------------------------------------------------------------

context_hash() {  # $@: base and build args; digest of them, the Dockerfile, its COPY sources and the wheels
  {
    printf '%s\n' "$@" "${EXTRAS:-}"
    $(engine_cmd) images -q "$1" 2>/dev/null || true
    ls "$WHEELS"
    awk '/^COPY /{for (i = 2; i < NF; i++) print $i}' Dockerfile \
      | xargs -I{} find {} -type f -not -path '*/__pycache__/*' -not -name '*.pyc' | LC_ALL=C sort | xargs sha256sum
    sha256sum Dockerfile
  } | sha256sum | cut -c1-16
}

image_label() {  # the braid.context label of $IMAGE, empty when absent
  local f='{{index .Config.Labels "braid.context"}}'
  if [ "$ENGINE" = buildah ]; then
    $(engine_cmd) inspect --type image --format '{{index .OCIv1.Config.Labels "braid.context"}}' "$IMAGE" 2>/dev/null || true
  else
    $(engine_cmd) image inspect --format "$f" "$IMAGE" 2>/dev/null || true
  fi
}

build_image() {  # $1: base image, rest: extra build args
  local base=$1 old hash; shift
  hash=$(context_hash "$base" "$@")
  if [ "${BRAID_REBUILD_IMAGE:-0}" != 1 ] && [ "$(image_label)" = "$hash" ]; then
    say "$IMAGE is up to date (context $hash); BRAID_REBUILD_IMAGE=1 rebuilds it"
    return
  fi
  old=$($(engine_cmd) images -q "$IMAGE" 2>/dev/null | head -1 || true)
  say "building $IMAGE on $base (up to ${T_BUILD}s)"
  local args=(build -f Dockerfile -t "$IMAGE" --label "braid.context=$hash" --build-arg "BASE_IMAGE=$base"
              --build-arg "EXTRAS=${EXTRAS:-}" "$@")
  [ "$ENGINE" = buildah ] && args+=(--isolation chroot --layers=false --force-rm)
  [ "$ENGINE" = podman ] && args+=(--force-rm)
  $(engine_cmd "$T_BUILD") "${args[@]}" . >&2 || die "image build failed or timed out after ${T_BUILD}s (see above)"
  local new; new=$($(engine_cmd) images -q "$IMAGE" | head -1)
  if [ -n "$old" ] && [ "$old" != "$new" ]; then $(engine_cmd) rmi "$old" >/dev/null 2>&1 || true; fi
}

report() {
  local size
  size=$($(engine_cmd) images --format '{{.Size}}' "$IMAGE" | head -1)
  say "built $IMAGE ($size); storage: ${BRAID_IMAGE_ROOT:-the engine default}"
  echo "$IMAGE $size"
}

main() {
  pick_engine
  local base=${BASE_IMAGE:-} build_args=()
  if [ -n "${BRAID_TORCH_INDEX_URL+x}" ]; then  # explicit: let pip use the network inside the build
    build_args+=(--build-arg "TORCH_INDEX_URL=$BRAID_TORCH_INDEX_URL")
    PYTAG=cp311
  else
    fill_wheelhouse
    build_args+=(--build-arg TORCH_INDEX_URL= --build-arg PIP_EXTRA_ARGS=--no-index)
  fi
  if [ -z "$base" ]; then
    if reachable https://registry-1.docker.io/v2/; then base=python:3.11-slim-bookworm
    else say "no container registry reachable: making the base from Debian packages"; base=$(local_base)
    fi
  fi
  build_image "$base" "${build_args[@]}"
  report
}

main "$@"
