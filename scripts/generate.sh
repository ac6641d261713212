#!/usr/bin/env bash
# Install noisewise with its embedded models into .venv and generate an image.
#   bash scripts/generate.sh "a large red circle on the left"          # -> out/image.png (out/image_2.png next)
#   bash scripts/generate.sh "two shapes: a green cross and a yellow triangle" --out out/b.png
set -euo pipefail
NW_EXTRAS=models source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
prompt="${1:-a large red circle on the left}"
shift || true
mkdir -p out
exec "$ROOT/.venv/bin/noisewise" generate "$prompt" --out out/image.png "$@"
