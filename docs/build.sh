#!/usr/bin/env bash
# Build the course as a static website, offline, into docs/_build/html (open docs/_build/html/index.html).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python docs/build.py "$@"
