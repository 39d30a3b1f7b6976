#!/usr/bin/env bash
# Install everything vnic needs on Debian 12, as root. Safe to run again:
# it installs only what is missing and reinstalls Python packages only when
# pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Kernel tools, traffic tools, nsenter/unshare and openssl for the emulated hosts
# and their test CA (tests/netns/hostbeds.py), the PostgreSQL server the tests run against,
# QEMU for the qemu driver's guests, Chromium for the web UI's browser tests
# (Playwright drives Debian's build; it downloads no browser), and what Python
# needs to build a virtual environment.
APT_PACKAGES=(
  iproute2 nftables iptables iputils-ping iperf3 irtt procps ethtool libc6-dev
  util-linux openssl
  python3 python3-venv python3-dev gcc
  postgresql prometheus
  qemu-system-x86
  chromium
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "vnic: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "vnic: needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "vnic: creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.vnic-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "vnic: installing Python packages (pinned by constraints.txt)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
  echo "$want" > "$stamp"
fi

# The qemu driver's boot image (kernel + initramfs, a few seconds the first
# time, cached under /var/cache/vnic/vm after that; see docs/qemu.md).
bash scripts/vm/build-image.sh >/dev/null
