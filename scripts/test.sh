#!/usr/bin/env bash
# Set up (first run only) with the dev dependencies, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
# shellcheck disable=SC1091
. .venv/bin/activate

echo "test: ruff"
ruff check qflow tests scripts examples docs/examples
echo "test: pytest"
# One worker per core; each test file stays on one worker, so its module fixtures (trained
# models, exported projects) are built once.
python -m pytest -q -n auto --dist loadfile --doctest-modules qflow tests "$@"
