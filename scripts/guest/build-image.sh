#!/usr/bin/env bash
# Build (or reuse) a small Debian bookworm guest that boots Debian's own stock
# kernel under QEMU. Why: the host kernel has no sch_netem and cannot load
# modules, so the netem code path can only be proven inside a guest whose
# kernel ships sch_netem as a module. scripts/guest/run.sh boots the result.
#
# Output, in $VNIC_GUEST_CACHE/<key>/ (default /var/cache/vnic/guest/<key>/):
#   disk.img     raw ext4 image of the root file system (no partition table)
#   vmlinuz      the stock kernel, taken out of the image's /boot
#   initrd.img   its initramfs, trimmed to what mounts a virtio-blk ext4 root
#   release      the kernel release (uname -r in the guest)
#   complete     written last: a directory without it is not a finished build
# <key> is a hash of this script, so editing the script builds a new guest and
# an unchanged script reuses the cached one. Prints the build directory on
# stdout (everything else goes to stderr), so callers can do
# dir=$(bash scripts/guest/build-image.sh).
#
# Run as root on Debian 12. Idempotent; concurrent runs wait on a lock.
set -euo pipefail

SUITE=bookworm
MIRROR=${VNIC_GUEST_MIRROR:-http://deb.debian.org/debian}
CACHE=${VNIC_GUEST_CACHE:-/var/cache/vnic/guest}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
KEY=$(sha256sum "$SELF" | cut -c1-16)
OUT="$CACHE/$KEY"

log() { echo "vnic-guest: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (debootstrap, chroot and mkfs need it)"
  exit 1
fi

# Host tools: QEMU for run.sh, debootstrap for the root file system,
# e2fsprogs for mkfs.ext4 -d. Installed only when missing, without recommends
# (qemu-system-x86's recommends pull in a desktop's worth of packages).
HOST_PACKAGES=(qemu-system-x86 debootstrap e2fsprogs util-linux zstd)
missing=()
for pkg in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing host packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

mkdir -p "$CACHE"
if [ -f "$OUT/complete" ]; then
  echo "$OUT"
  exit 0
fi

# One build at a time: a second caller waits here, then finds the finished one.
exec 9>"$CACHE/.lock"
flock 9
if [ -f "$OUT/complete" ]; then
  echo "$OUT"
  exit 0
fi

# Everything is staged in a directory of our own next to the result and moved
# into place at the end, so an interrupted build never looks complete.
STAGE=$(mktemp -d "$CACHE/.build-$KEY.XXXXXX")
cleanup() {
  # Only the staging directory this run made. Mounts made in the target live
  # in private mount namespaces (unshare below), so none are left behind for
  # rm to walk into; --one-file-system guards against it all the same.
  rm -rf --one-file-system -- "$STAGE"
}
trap cleanup EXIT
ROOT="$STAGE/root"
mkdir -p "$ROOT"
started=$SECONDS

# Configure the initramfs before debootstrap installs the kernel, so the
# kernel's postinst builds the initrd once, already trimmed. The stock kernel
# has virtio_pci, virtio_blk and ext4 as modules; force_load puts them in the
# initrd and loads them at boot, whether or not the initrd's udev would.
# MODULES=list keeps everything else out (smaller initrd = faster boot under
# TCG). None of these files belongs to a package, so dpkg leaves them be.
mkdir -p "$ROOT/etc/initramfs-tools/conf.d" "$ROOT/etc/initramfs-tools/hooks"
cat >"$ROOT/etc/initramfs-tools/conf.d/vnic-guest.conf" <<'EOF'
MODULES=list
COMPRESS=zstd
EOF
cat >"$ROOT/etc/initramfs-tools/hooks/vnic-guest" <<'EOF'
#!/bin/sh
# vnic guest: what it takes to mount a virtio-blk ext4 root without udev.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk crc32c_generic ext4; do
  force_load "$m"
done
EOF
chmod 755 "$ROOT/etc/initramfs-tools/hooks/vnic-guest"

# What the guest runs:
#  - the stock kernel + initramfs-tools to build its initrd;
#  - the traffic tools the tests drive (tc comes with iproute2, together with
#    the netem distribution tables, /usr/lib/x86_64-linux-gnu/tc/*.dist);
#  - python3 (3.11, same as the host's Debian) and the shared libraries a
#    pyenv-built CPython 3.11 and the wheels in .venv link against, so the
#    host's interpreter, shared over 9p, runs unchanged;
#  - gcc and libc6-dev: vnic compiles its C helpers (src/vnic/engine/*.c)
#    on first use, in the guest as on the host.
# No systemd: /sbin/vnic-init below is PID 1, which boots in a few seconds.
PACKAGES=(
  linux-image-amd64 initramfs-tools kmod
  iproute2 nftables iptables iperf3 irtt iputils-ping procps ethtool
  python3 gcc libc6-dev
  libssl3 libffi8 libsqlite3-0 zlib1g libbz2-1.0 liblzma5 libreadline8
  libncursesw6 libtinfo6 libuuid1 libexpat1 libnsl2 libtirpc3 libgdbm6
)
# Downloaded .debs are kept (per suite) so that a rebuild after editing this
# script does not fetch them all again.
DEBS="$CACHE/debs-$SUITE"
mkdir -p "$DEBS"
log "debootstrap $SUITE into $ROOT (this takes a few minutes)"
# In a private mount namespace: the /proc and /sys debootstrap mounts in the
# target vanish with it, even if it is interrupted.
unshare --mount --propagation private \
  debootstrap --variant=minbase --components=main --cache-dir="$DEBS" \
  --include="$(IFS=,; echo "${PACKAGES[*]}")" \
  "$SUITE" "$ROOT" "$MIRROR" >&2

# PID 1 of the guest. It mounts the kernel file systems, loads the 9p and
# virtio-console modules, mounts the shares run.sh describes in
# /run/vnic-guest/mounts, runs /run/vnic-guest/cmd with stdout/stderr on two virtio
# serial ports that run.sh connects to its own stdout/stderr, writes the exit
# code to /run/vnic-guest/rc on the control share, and powers off.
cat >"$ROOT/sbin/vnic-init" <<'EOF'
#!/bin/bash
# PID 1 of the vnic test guest (see scripts/guest/build-image.sh).
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb

say() { echo "vnic-init: $*" >/dev/console; }

# A mount the initramfs has not already moved into place.
mnt() { # type source target options
  mountpoint -q "$3" 2>/dev/null && return 0
  mkdir -p "$3"
  mount -t "$1" -o "$4" "$2" "$3" || say "mounting $3 failed"
}

poweroff_now() {
  sync
  # Unmount the shares so nothing the command wrote is left in a guest cache.
  # Shares last mounted first: a share may sit inside another.
  local i
  for ((i = ${#SHARES[@]} - 1; i >= 0; i--)); do
    umount "${SHARES[i]}" 2>/dev/null
  done
  mount -o remount,ro / 2>/dev/null
  echo 1 >/proc/sys/kernel/sysrq
  echo o >/proc/sysrq-trigger
  sleep 30
  exit 1 # PID 1 exiting panics the kernel; with panic=1 and -no-reboot QEMU stops
}

SHARES=()
mnt proc proc /proc nosuid,nodev,noexec
mnt sysfs sysfs /sys nosuid,nodev,noexec
mnt devtmpfs devtmpfs /dev mode=0755,nosuid
mnt devpts devpts /dev/pts gid=5,mode=620,ptmxmode=666
mnt tmpfs tmpfs /dev/shm mode=1777,nosuid,nodev
mnt tmpfs tmpfs /run mode=0755,nosuid,nodev
mnt tmpfs tmpfs /tmp mode=1777,nosuid,nodev
mnt cgroup2 cgroup2 /sys/fs/cgroup nosuid,nodev,noexec
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# devtmpfs has no /dev/fd; bash's <(...) and many tools want it.
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
mount -o remount,rw / 2>/dev/null
hostname vnic-guest
ip link set lo up

modprobe -a 9pnet_virtio 9p virtio_console virtio_rng 2>/dev/null \
  || say "modprobe of 9p/virtio modules failed"

mkdir -p /run/vnic-guest
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vnicctl /run/vnic-guest; then
  say "no control share (vnicctl); was this booted by scripts/guest/run.sh?"
  poweroff_now
fi

# Shares: one line each, "tag path ro|rw cache".
while read -r tag path mode cache; do
  [ -n "$tag" ] || continue
  mkdir -p "$path"
  if mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,$mode,cache=$cache,access=client" "$tag" "$path"; then
    SHARES+=("$path")
  else
    say "mounting share $tag at $path failed"
  fi
done </run/vnic-guest/mounts

# The command's stdout and stderr go to virtio serial ports named by run.sh;
# they are not ttys, so bytes pass unchanged (no \n -> \r\n).
out=/dev/console err=/dev/console
for port in /sys/class/virtio-ports/*; do
  [ -r "$port/name" ] || continue
  case "$(cat "$port/name")" in
    vnic.stdout) out=/dev/${port##*/} ;;
    vnic.stderr) err=/dev/${port##*/} ;;
  esac
done

bash /run/vnic-guest/cmd </dev/null >"$out" 2>"$err"
rc=$?
echo "$rc" >/run/vnic-guest/rc.tmp && mv /run/vnic-guest/rc.tmp /run/vnic-guest/rc
umount /run/vnic-guest
poweroff_now
EOF
chmod 755 "$ROOT/sbin/vnic-init"

echo vnic-guest >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
# The kernel mounts the root read-write itself (rw on the command line); the
# fstab only documents it.
echo '/dev/vda / ext4 rw,relatime 0 1' >"$ROOT/etc/fstab"

# Check what the guest depends on before calling the build good.
release=$(find "$ROOT/lib/modules/" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort | tail -n1)
for f in "boot/vmlinuz-$release" "boot/initrd.img-$release"; do
  [ -f "$ROOT/$f" ] || { log "missing $f in the root file system"; exit 1; }
done
for m in sch_netem 9p 9pnet_virtio virtio_console; do
  grep -q "/$m.ko" "$ROOT/lib/modules/$release/modules.dep" \
    || { log "module $m not in the stock kernel's modules.dep"; exit 1; }
done
initrd_list=$(unshare --mount chroot "$ROOT" lsinitramfs "/boot/initrd.img-$release")
for m in virtio_pci virtio_blk ext4; do
  grep -q "/$m.ko" <<<"$initrd_list" || { log "initrd lacks $m.ko"; exit 1; }
done
# tc reads the netem tables from its libdir (/usr/lib/x86_64-linux-gnu/tc on
# bookworm, /usr/lib/tc elsewhere).
compgen -G "$ROOT/usr/lib/*/tc/normal.dist" >/dev/null || compgen -G "$ROOT/usr/lib/tc/normal.dist" >/dev/null \
  || { log "iproute2's netem distribution tables are missing"; exit 1; }

# Take the kernel and initrd out, then slim the image: no /boot (booted with
# -kernel/-initrd), no .deb or apt lists, no docs.
mkdir -p "$STAGE/out"
cp "$ROOT/boot/vmlinuz-$release" "$STAGE/out/vmlinuz"
cp "$ROOT/boot/initrd.img-$release" "$STAGE/out/initrd.img"
echo "$release" >"$STAGE/out/release"
rm -f -- "$ROOT/boot/vmlinuz-$release" "$ROOT/boot/initrd.img-$release" \
  "$ROOT/boot/System.map-$release" "$ROOT/boot/config-$release"
rm -f -- "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/apt/*.bin
rm -rf -- "$ROOT/var/lib/apt/lists" "$ROOT/usr/share/doc" "$ROOT/usr/share/man" "$ROOT/usr/share/info"
mkdir -p "$ROOT/var/lib/apt/lists/partial"

# ext4 straight from the directory (mkfs.ext4 -d), sized to the content plus
# room for what tests write to / (the shares and /tmp are not on it). Sparse,
# and opened read-only by run.sh (-snapshot), so the cache never changes.
used_mb=$(du -sm --apparent-size "$ROOT" | cut -f1)
size_mb=$((used_mb * 13 / 10 + 512))
log "making ${size_mb} MiB ext4 image (${used_mb} MiB of files)"
mkfs.ext4 -q -F -L vnic-guest -d "$ROOT" "$STAGE/out/disk.img" "${size_mb}M" >&2
e2fsck -fn "$STAGE/out/disk.img" >/dev/null 2>&1 || { log "e2fsck found errors in the new image"; exit 1; }

cat >"$STAGE/out/info" <<EOF
suite=$SUITE
mirror=$MIRROR
kernel=$release
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$((SECONDS - started))
script_sha256=$(sha256sum "$SELF" | cut -d' ' -f1)
EOF
touch "$STAGE/out/complete"
rm -rf --one-file-system -- "$OUT" # a stale, incomplete result of an earlier try
mv "$STAGE/out" "$OUT"

# Builds of earlier versions of this script are not removed automatically;
# say where they are so they can be.
for d in "$CACHE"/*/; do
  d=${d%/}
  [ "$d" != "$OUT" ] && [ -f "$d/complete" ] && log "older guest build (safe to remove): $d"
done
log "built $OUT (kernel $release) in $((SECONDS - started)) s"
echo "$OUT"
