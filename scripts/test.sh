#!/usr/bin/env bash
# Set up (first run only) with the dev dependencies, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# shellcheck disable=SC1091
. .venv/bin/activate

echo "test: ruff"
ruff check qflow tests scripts examples
echo "test: pytest"
python -m pytest -q --doctest-modules qflow tests "$@"
