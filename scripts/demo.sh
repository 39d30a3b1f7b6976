#!/usr/bin/env bash
# The README's first command: install everything, then run the demo (on this host, then
# a session stretched over 3 emulated hypervisor hosts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/vnic demo --profiles examples/demo --hosts 3
