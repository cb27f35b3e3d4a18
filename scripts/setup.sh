#!/bin/bash
# Set up a fresh Debian 12 machine for lazysnap, idempotently: apt packages, then a
# virtualenv in .venv with lazysnap, its dev tools and the bench extra installed (editable).
# Run as root. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv    # pyfuse3 builds against libfuse3
  docker-registry apache2-utils                                 # the real OCI registry, htpasswd for basic auth
  containerd runc stargz-snapshotter skopeo umoci               # the real containerd stack, ctr-remote (eStargz)
  golang-go golang-github-containerd-containerd-dev             # containerd's conformance suite and protos
  iproute2 zstd debootstrap psmisc util-linux                   # netns/tbf, zstd CLI, image builder, fuser, unshare
  busybox-static                                                # a static shell for the tiny image of test_bench
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's docker-registry package starts a system registry on :5000; lazysnap's tests start their own.
if systemctl is-active --quiet docker-registry 2>/dev/null; then systemctl stop docker-registry || true; fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.lazysnap-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing lazysnap and its dependencies into .venv"
  # This machine's pip config names local mirror folders that may be absent: hide those warnings only.
  quiet_pip() { .venv/bin/pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
  quiet_pip --upgrade pip
  quiet_pip -e '.[dev,bench]'  # bench: matplotlib, for `lazysnap bench` and its tests
  touch "$stamp"
fi
# Byte-compile lazysnap itself, as an installed package would be: with PYTHONDONTWRITEBYTECODE set
# (it is on some machines) every `lazysnap mount` would otherwise compile ~40 ms of source first.
.venv/bin/python -m compileall -q index fusefs snapshotter >/dev/null || true
modprobe fuse 2>/dev/null || true
echo "setup: ready (.venv/bin/lazysnap)"
