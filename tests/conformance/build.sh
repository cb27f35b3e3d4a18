#!/bin/bash
# Build the conformance harness (harness/main.go) into OUT/harness, offline, from
# Debian's packaged Go sources: GOPATH mode against /usr/share/gocode, no module
# downloads. Debian ships containerd 1.6 as golang-github-containerd-containerd-dev
# (it depends on every other -dev package the build needs) and Go as golang-go;
# ./scripts/setup.sh installs both.
#
#   tests/conformance/build.sh OUT
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUT (the directory to put the harness binary in)}"
gocode=/usr/share/gocode
suite="$gocode/src/github.com/containerd/containerd/snapshots/testsuite/testsuite.go"

command -v go >/dev/null || {
  echo "build.sh: no 'go' on PATH: apt-get install golang-go (./scripts/setup.sh does it)" >&2
  exit 3
}
[ -f "$suite" ] || {
  echo "build.sh: containerd's Go sources are missing ($suite):" \
    "apt-get install golang-github-containerd-containerd-dev (./scripts/setup.sh does it)" >&2
  exit 3
}

mkdir -p "$out/gopath"
# GOPATH mode: the first entry is a writable scratch dir, the second Debian's sources.
# Static (CGO_ENABLED=0), so the binary needs nothing at run time.
export GO111MODULE=off GOFLAGS= GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0
export GOPATH="$out/gopath:$gocode"
export GOCACHE="${GOCACHE:-$out/gocache}"
cd "$here"
go vet ./harness
# Built under a temporary name and renamed, so a concurrent reader never sees half a binary.
go build -o "$out/harness.partial.$$" ./harness
mv -f "$out/harness.partial.$$" "$out/harness"
echo "build.sh: built $out/harness ($(go version | cut -d' ' -f3), containerd $(dpkg-query -W -f='${Version}' golang-github-containerd-containerd-dev 2>/dev/null || echo unknown))"
