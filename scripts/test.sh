#!/usr/bin/env bash
# The README's second command: install what is missing, then lint, type-check,
# check the layers' import contracts (docs/architecture.md) and run every test
# tier (unit, netns, e2e). Extra arguments go to pytest.
#
# Delay and loss have two engines (netem, and vnic's own delay engine where
# netem is missing), and each must be tested somewhere:
# - on a kernel without netem (like CI's), the host run covers the delay
#   engine, and the impairment tests run again through netem in a QEMU guest
#   with Debian's stock kernel (scripts/guest, image cached);
# - on a kernel with netem, the host run covers netem, and the impairment
#   tests run again with the delay engine forced.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
echo "== ruff"
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
echo "== mypy"
.venv/bin/mypy
echo "== import-linter (the layers: docs/architecture.md)"
.venv/bin/lint-imports
echo "== pytest"
# The slowest tests are listed: where the run's time goes, to keep it well under 45 minutes.
.venv/bin/pytest --durations=30 tests "$@"

IMPAIRMENT_TESTS=tests/netns/test_impairments.py
if .venv/bin/python -c 'import sys; from vnic.dataplane.probe import netem_available as n; sys.exit(0 if n() else 1)'; then
  echo "== pytest: impairments through the vnic delay engine (this kernel has netem)"
  VNIC_ENGINE=delayd .venv/bin/pytest "$IMPAIRMENT_TESTS"
else
  echo "== pytest: impairments through netem, in a stock-kernel guest (this kernel has none)"
  # Software emulation deschedules processes for milliseconds: timing
  # tolerances widen there, statistical ones do not (see the test module).
  # A run takes about 6 minutes. A guest that hangs or dies (exit 124 or 125:
  # the emulator, not a test) is started once more; a failed test is not.
  # -v and unbuffered output show where a guest was when it was stopped.
  for attempt in 1 2; do
    rc=0
    VNIC_TEST_TIMING_SLACK=3 VNIC_GUEST_TIMEOUT=900 PYTHONUNBUFFERED=1 \
      VNIC_GUEST_ENV=PYTHONUNBUFFERED bash scripts/guest/run.sh \
      .venv/bin/python -m pytest -p no:cacheprovider -rs -v "$IMPAIRMENT_TESTS" || rc=$?
    if [ "$rc" -ne 124 ] && [ "$rc" -ne 125 ]; then
      exit "$rc"
    fi
    echo "== the guest stopped without a result (exit $rc), attempt $attempt of 2"
  done
  exit "$rc"
fi
