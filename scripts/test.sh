#!/usr/bin/env bash
# The README's second command: install what is missing, then lint, type-check
# and run every test tier (unit, netns, e2e). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
echo "== ruff"
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/pytest tests "$@"
