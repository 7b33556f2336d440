#!/usr/bin/env bash
# Installs the test dependencies and runs the whole suite: lint, types, then the tests against
# the real kernel, runc, registry and namespaces. Run as root. Extra args go to pytest.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${FLATPOD_VENV:-/opt/flatpod/venv}
"$repo/hack/setup.sh" --test
cd "$repo"
export PYTHONPATH="$repo"

echo "== ruff"
"$venv/bin/ruff" check .
echo "== mypy --strict"
"$venv/bin/mypy" --strict
echo "== pytest"
"$venv/bin/python" -m pytest -p no:cacheprovider "$@"
