#!/usr/bin/env bash
# Run one command inside a QEMU guest that boots Debian's stock kernel, which
# has sch_netem (the host's kernel does not). Usage:
#
#   bash scripts/guest/run.sh CMD [ARGS...]
#   bash scripts/guest/run.sh .venv/bin/python -m pytest tests/netns -q
#
# The command runs as root in the guest, in this repository's root, which is
# shared from the host at the same path (read-write), together with the
# Python installation .venv was made from (read-only), so .venv/bin/python
# works unchanged. Its stdout and stderr arrive on this script's stdout and
# stderr, and its exit code is this script's exit code. Beyond that:
#   124  the run took longer than VNIC_GUEST_TIMEOUT (QEMU was killed)
#   125  the guest stopped without reporting an exit code (see its console)
#
# Environment:
#   VNIC_GUEST_TIMEOUT  seconds for the whole run, boot included (1200)
#   VNIC_GUEST_MEM      guest memory in MiB (2048)
#   VNIC_GUEST_SMP      guest CPUs (2)
#   VNIC_GUEST_CACHE    where build-image.sh keeps the image (/var/cache/vnic/guest)
#   VNIC_GUEST_VERBOSE  1: show the guest's boot console on stderr
#   VNIC_GUEST_CONSOLE  file to keep the guest's console log in
#   VNIC_GUEST_SHARE    more host directories to share, "PATH[:ro] ..."
#   VNIC_GUEST_ENV      more variable names to pass into the guest; CI and
#                       every VNIC_* variable (but VNIC_GUEST_*) always are
#   VNIC_GUEST_9P_CACHE guest cache mode of the repository share (loose:
#                       fast; mmap: sees host edits made during the run)
#   VNIC_GUEST_APPEND   extra kernel command line words
#   VNIC_GUEST_QEMU_ARGS  extra QEMU arguments (split on spaces)
#   VNIC_GUEST_SCHED    how QEMU is scheduled on the host: rr (default: the
#                       real-time round-robin class, priority 1; nice -10 where
#                       that is refused), nice (nice -10) or none
#
# QEMU runs with -accel tcg: this host's /dev/kvm cannot run stock kernels.
# The cached image is opened with snapshot=on: guest writes to / go to a
# throw-away overlay, never into the cache.
set -euo pipefail

if [ $# -eq 0 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi

HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
REPO=$(cd "$HERE/../.." && pwd -P)
TIMEOUT=${VNIC_GUEST_TIMEOUT:-1200}
MEM=${VNIC_GUEST_MEM:-2048}
SMP=${VNIC_GUEST_SMP:-2}

log() { echo "vnic-guest: $*" >&2; }

# Builds the image on first use (minutes), otherwise just prints where it is.
# It also installs QEMU if a fresh machine lacks it.
IMAGE=$(bash "$HERE/build-image.sh")

# State of this run: the control share (command, mounts, exit code), the FIFOs
# the guest's stdout/stderr come through, and the console log.
CTL=$(mktemp -d /tmp/vnic-guest.XXXXXX)
QEMU_PID="" WATCHDOG_PID="" OUT_PID="" ERR_PID="" TAIL_PID=""

stop_pid() { # pid: TERM, a few seconds' grace, then KILL; only this pid
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  stop_pid "$QEMU_PID"
  stop_pid "$WATCHDOG_PID"
  stop_pid "$TAIL_PID"
  # The readers end by themselves once QEMU has closed the FIFOs; these only
  # matter when QEMU died before opening them.
  stop_pid "$OUT_PID"
  stop_pid "$ERR_PID"
  if [ -n "${VNIC_GUEST_CONSOLE:-}" ] && [ -f "$CTL/console.log" ]; then
    cp "$CTL/console.log" "$VNIC_GUEST_CONSOLE" || true
  fi
  rm -rf -- "$CTL"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM HUP

# --- what the guest mounts --------------------------------------------------
# Each share: QEMU -fsdev/-device arguments plus a line "tag path ro|rw cache"
# in $CTL/mounts that the guest's init mounts at the same path.
QEMU_SHARES=()
: >"$CTL/mounts"
n=0
add_share() { # path ro|rw cache
  local path=$1 mode=$2 cache=$3 ro=""
  n=$((n + 1))
  [ "$mode" = ro ] && ro=",readonly=on"
  # passthrough: files the guest's root creates are owned by root on the host
  # too, as when the command runs on the host.
  QEMU_SHARES+=(
    -fsdev "local,id=fs$n,path=$path,security_model=passthrough$ro"
    -device "virtio-9p-pci,fsdev=fs$n,mount_tag=share$n"
  )
  echo "share$n $path $mode $cache" >>"$CTL/mounts"
}
# The repository, read-write. cache=loose lets the guest cache metadata and
# pages: without it every stat/open is a 9p round trip (~1.5 ms under TCG)
# and Python imports from .venv take many times longer. The price: host
# edits made while the guest runs may go unseen. The guest's init syncs and
# unmounts the shares before powering off, so all it wrote is on the host
# when this script returns.
add_share "$REPO" rw "${VNIC_GUEST_9P_CACHE:-loose}"
# The Python .venv was made from (pyenv's prefix on this machine). Read-only
# and unchanging during a run, so the guest may cache it (faster imports).
# Not when it is the system Python: the guest's own /usr has the same Debian
# python3, and a share over /usr would hide the guest's system.
if [ -x "$REPO/.venv/bin/python" ]; then
  prefix=$("$REPO/.venv/bin/python" -c 'import sys; print(sys.base_prefix)')
  case "$prefix" in
    / | /usr | /usr/local) ;;
    "$REPO"/*) ;;
    *) add_share "$(readlink -f "$prefix")" ro loose ;;
  esac
else
  log "no $REPO/.venv yet (run scripts/install.sh); sharing the repository only"
fi
for spec in ${VNIC_GUEST_SHARE:-}; do
  case "$spec" in
    *:ro) add_share "$(readlink -f "${spec%:ro}")" ro loose ;;
    *) add_share "$(readlink -f "$spec")" rw mmap ;;
  esac
done

# --- the command ------------------------------------------------------------
# A bash script with every word quoted by printf %q, so arguments arrive
# exactly as given here.
{
  echo "cd -- $(printf %q "$REPO") || exit 125"
  echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  for name in $(compgen -e); do
    case "$name" in
      VNIC_GUEST_*) continue ;;
      VNIC_* | CI) ;;
      *) [[ " ${VNIC_GUEST_ENV:-} " == *" $name "* ]] || continue ;;
    esac
    echo "export $name=$(printf %q "${!name}")"
  done
  printf 'exec'
  printf ' %q' "$@"
  echo
} >"$CTL/cmd"

# --- output -----------------------------------------------------------------
# The guest writes the command's stdout/stderr to two virtio serial ports;
# QEMU writes those into FIFOs, and cat copies them to our own stdout/stderr,
# whatever those are (terminal, pipe, file, socket). The readers start first:
# QEMU's open of a FIFO waits for its reader.
mkfifo "$CTL/out.fifo" "$CTL/err.fifo"
cat "$CTL/out.fifo" &
OUT_PID=$!
cat "$CTL/err.fifo" >&2 &
ERR_PID=$!
: >"$CTL/console.log"
if [ "${VNIC_GUEST_VERBOSE:-0}" = 1 ]; then
  quiet=""
else
  quiet="quiet loglevel=3"
fi

ORPHAN_GUARD=(setpriv --pdeathsig KILL)

# --- boot ---------------------------------------------------------------------
# -nodefaults: no VGA, NIC, monitor or default serial; only what is listed.
# -no-reboot + panic=1: a guest that crashes (or whose init dies) ends QEMU
# instead of rebooting in a loop. -cpu max: TCG's fullest CPU model, so wheels
# built for newer x86-64 levels run.
QEMU=(
  qemu-system-x86_64
  -accel tcg -cpu max -smp "$SMP" -m "$MEM"
  -nodefaults -no-user-config -display none -no-reboot -nic none
  -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img"
  -append "console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/sbin/vnic-init panic=1 fsck.mode=skip $quiet ${VNIC_GUEST_APPEND:-}"
  -drive "file=$IMAGE/disk.img,format=raw,if=virtio,snapshot=on,cache=unsafe"
  -serial "file:$CTL/console.log"
  -device virtio-rng-pci
  -device virtio-serial-pci
  -chardev "file,id=vout,path=$CTL/out.fifo"
  -device "virtserialport,chardev=vout,name=vnic.stdout"
  -chardev "file,id=verr,path=$CTL/err.fifo"
  -device "virtserialport,chardev=verr,name=vnic.stderr"
  -fsdev "local,id=fsctl,path=$CTL,security_model=none"
  -device "virtio-9p-pci,fsdev=fsctl,mount_tag=vnicctl"
  "${QEMU_SHARES[@]}"
)
# shellcheck disable=SC2206 # split on purpose: these are separate arguments
QEMU+=(${VNIC_GUEST_QEMU_ARGS:-})
# QEMU's own messages go to our stderr; its stdin is nothing. setpriv
# --pdeathsig: should this script itself be killed with SIGKILL (no trap
# runs then), the kernel kills QEMU too instead of leaving it running.
# The guest's clock is QEMU's threads: a host process busy on the same core
# makes every guest timer late by a scheduler slice. With a busy loop on one
# core, a 20 ms netem delay measured 1.9 ms long at the median, a 40 ms one
# with 4 ms jitter 4.5-5.8 ms long on average; nice -10 fixed the first only.
# In the real-time class QEMU's threads preempt any normal process when they
# wake; the kernel's real-time throttling (95 % of each second by default)
# still leaves the host time should the guest spin.
case "${VNIC_GUEST_SCHED:-rr}" in
  rr) if chrt -r 1 true 2>/dev/null; then SCHED=(chrt -r 1); else
        log "the real-time class is refused here; QEMU runs at nice -10"
        SCHED=(nice -n -10); fi ;;
  nice) SCHED=(nice -n -10) ;;
  none) SCHED=() ;;
  *) log "VNIC_GUEST_SCHED must be rr, nice or none, not ${VNIC_GUEST_SCHED}"; exit 2 ;;
esac
"${SCHED[@]}" "${ORPHAN_GUARD[@]}" "${QEMU[@]}" </dev/null >&2 &
QEMU_PID=$!
if [ "${VNIC_GUEST_VERBOSE:-0}" = 1 ]; then
  tail -n +1 -f --pid="$QEMU_PID" "$CTL/console.log" >&2 &
  TAIL_PID=$!
fi

# Wait for QEMU or the deadline, whichever comes first.
"${ORPHAN_GUARD[@]}" sleep "$TIMEOUT" &
WATCHDOG_PID=$!
qemu_rc=0
wait -n "$QEMU_PID" "$WATCHDOG_PID" || true
if kill -0 "$QEMU_PID" 2>/dev/null; then
  log "timed out after ${TIMEOUT} s; killing QEMU (pid $QEMU_PID)"
  stop_pid "$QEMU_PID"
  QEMU_PID=""
  tail -n 20 "$CTL/console.log" | sed 's/^/vnic-guest console: /' >&2
  exit 124
fi
wait "$QEMU_PID" || qemu_rc=$?
QEMU_PID=""
stop_pid "$WATCHDOG_PID"
WATCHDOG_PID=""
# Let the readers pass on the last bytes before we exit.
wait "$OUT_PID" 2>/dev/null || true
wait "$ERR_PID" 2>/dev/null || true
OUT_PID="" ERR_PID=""
[ -z "$TAIL_PID" ] || wait "$TAIL_PID" 2>/dev/null || true
TAIL_PID=""

if [ -f "$CTL/rc" ]; then
  exit "$(cat "$CTL/rc")"
fi
log "the guest stopped without an exit code (QEMU exit status $qemu_rc); last console lines:"
tail -n 40 "$CTL/console.log" | sed 's/^/vnic-guest console: /' >&2
exit 125
