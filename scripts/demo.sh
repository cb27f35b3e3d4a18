#!/bin/bash
# Set up this machine (scripts/setup.sh), then run lazysnap's main job on its embedded default:
# a local registry with a sample image, mounted lazily.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/lazysnap demo "$@"
