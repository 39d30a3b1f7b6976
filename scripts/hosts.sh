#!/usr/bin/env bash
# Emulated hypervisor hosts on this machine, as root (docs/testbed.md):
#   scripts/hosts.sh up N [TAG]   makes N hosts and a manager host; prints how to enter each
#   scripts/hosts.sh down TAG     removes that bed and everything vnic made inside its hosts
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m vnic.lab.hostbed_main "$@"
