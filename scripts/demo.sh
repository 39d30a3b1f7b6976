#!/usr/bin/env bash
# The README's first command: install everything, then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/vnic demo --profiles examples/demo
