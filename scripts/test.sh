#!/usr/bin/env bash
# Install noisewise with its test extras into .venv and run the test suite.
#   bash scripts/test.sh            # the whole default suite (what CI runs)
#   bash scripts/test.sh -k unipc   # extra arguments go to pytest
set -euo pipefail
NW_EXTRAS=test source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# k-diffusion is a test oracle only; its declared dependencies would pull torchvision and a second
# torch build, and its samplers need none of them (tests/oracles.py loads them on their own).
"$VPY" -c "import k_diffusion" 2>/dev/null || "$VPY" -m pip install -q --no-deps "k-diffusion==0.1.1.post1"
# tests/test_web.py drives Debian's chromium through Playwright (never a downloaded browser)
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  { apt-get update -q && apt-get install -y -q chromium; } >/dev/null || echo "no chromium: tests/test_web.py will skip"
fi
"$VPY" -m ruff check src tests bench
set +e
"$VPY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when a filter selects no test: not a failure of the suite
if [ "$rc" -eq 5 ]; then echo "no tests selected"; exit 0; fi
exit "$rc"
