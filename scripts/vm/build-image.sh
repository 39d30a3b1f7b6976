#!/usr/bin/env bash
# Build (or reuse) the boot image of the qemu driver's guests: Debian's cloud
# kernel and a small initramfs (busybox, the QEMU guest agent, iperf3, irtt,
# ethtool) whose init configures the virtio NIC from the kernel command line
# and starts the agent. Nothing is installed on the host: the kernel, busybox
# and qemu-guest-agent packages are downloaded and unpacked (dpkg -x) here.
#
# Output, in $VNIC_VM_CACHE/<key>/ (default /var/cache/vnic/vm/<key>/):
#   vmlinuz      the kernel (linux-image-cloud-amd64)
#   initrd.img   the initramfs (gzip'd newc cpio); its /init is the guest's PID 1
#   info         what went in: package versions, sizes, build time
#   complete     written last: a directory without it is not a finished build
# <key> hashes this script and the host binaries copied in, so editing the
# script (or upgrading iperf3) builds a new image and anything else reuses
# the cached one. Prints the build directory on stdout (everything else goes
# to stderr): dir=$(bash scripts/vm/build-image.sh).
#
# The guest (see GUEST INIT below) reads from the kernel command line:
#   vnic.ipv4=ADDR/PREFIX  vnic.ipv6=ADDR/PREFIX  the NIC's addresses
#   vnic.sysctl=KEY=VALUE[,KEY=VALUE...]          sysctls set before the NIC is up
#   vnic.offload=off                              TSO/GSO off on eth0
#   vnic.nic=NAME,MAC,ADDR4/PREFIX,ADDR6/PREFIX[,off]  one more NIC (eth1...):
#                                                 found by its MAC, named NAME,
#                                                 its addresses (off: no TSO/GSO)
# and prints "vnic-guest: ready" on the console once the NIC is up and the agent
# is about to start. Run as root on Debian 12. Concurrent runs wait on a lock.
set -euo pipefail

CACHE=${VNIC_VM_CACHE:-/var/cache/vnic/vm}
SELF=$(readlink -f "${BASH_SOURCE[0]}")
# The host tools copied into the guest, with their shared libraries.
GUEST_TOOLS=(/usr/bin/iperf3 /usr/bin/irtt /usr/sbin/ethtool /usr/bin/ping)
# Kernel modules the guest loads (with what they depend on): the virtio NIC,
# the virtio console the agent talks over, and BBR for tcp.congestion_control.
GUEST_MODULES=(virtio_pci virtio_net virtio_console tcp_bbr)

log() { echo "vnic-vm-image: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root"
  exit 1
fi
for tool in "${GUEST_TOOLS[@]}"; do
  [ -x "$tool" ] || { log "missing $tool on the host (run scripts/install.sh)"; exit 1; }
done

KEY=$( (cat "$SELF" "${GUEST_TOOLS[@]}") | sha256sum | cut -c1-16)
OUT="$CACHE/$KEY"
mkdir -p "$CACHE"
if [ -f "$OUT/complete" ]; then
  echo "$OUT"
  exit 0
fi
exec 9>"$CACHE/.lock"
flock 9
if [ -f "$OUT/complete" ]; then
  echo "$OUT"
  exit 0
fi

STAGE=$(mktemp -d "$CACHE/.build-$KEY.XXXXXX")
trap 'rm -rf --one-file-system -- "$STAGE"' EXIT
started=$SECONDS

# --- packages: downloaded into the stage, unpacked, never installed --------------
# The package lists may be missing on a fresh machine (or a container image
# that removed them); apt-get download needs them.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  log "apt-get update (package lists are missing)"
  apt-get update -qq >&2
fi
KERNEL_PKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$KERNEL_PKG" ] || { log "cannot find the package linux-image-cloud-amd64 depends on"; exit 1; }
PACKAGES=("$KERNEL_PKG" busybox-static qemu-guest-agent)
mkdir -p "$STAGE/debs" "$STAGE/x"
log "downloading ${PACKAGES[*]}"
# _apt cannot write into root's private stage; the download is from Debian's
# signed archive either way.
(cd "$STAGE/debs" && apt-get download -q "${PACKAGES[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
for pkg in "${PACKAGES[@]}"; do
  deb=$(find "$STAGE/debs" -name "${pkg}_*.deb" | head -n1)
  [ -n "$deb" ] || { log "download of $pkg failed"; exit 1; }
  dpkg -x "$deb" "$STAGE/x"
  echo "$pkg=$(dpkg-deb -f "$deb" Version)" >>"$STAGE/versions"
done
X="$STAGE/x"
BUSYBOX="$X/bin/busybox"
release=$(find "$X/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | head -n1)
[ -f "$X/boot/vmlinuz-$release" ] || { log "no kernel in $KERNEL_PKG"; exit 1; }

# --- the guest's root file system ---------------------------------------------------
R="$STAGE/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,root,var,lib64}
ln -s /run "$R/var/run" # qemu-ga keeps its state in /var/run
cp "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
  [ -e "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done
copy_with_libs() { # binary destination
  rm -f "$R$2" # a busybox applet of the same name gives way to the real tool
  cp -L "$1" "$R$2"
  local lib
  for lib in $(ldd "$1" | grep -o '/[^ ]*'); do
    mkdir -p "$R$(dirname "$lib")"
    cp -Ln "$lib" "$R$lib"
  done
}
for tool in "${GUEST_TOOLS[@]}"; do
  copy_with_libs "$tool" "$tool"
done
copy_with_libs "$X/usr/sbin/qemu-ga" /usr/sbin/qemu-ga
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost\n' >"$R/etc/hosts"

# Modules: the ones named and what they need, found with busybox's depmod on
# the unpacked tree; busybox modprobe reads the modules.dep made for the guest.
"$BUSYBOX" depmod -b "$X" "$release"
MODDIR="lib/modules/$release"
needed=$(for m in "${GUEST_MODULES[@]}"; do
  grep -E "(^|/)$m\.ko:" "$X/$MODDIR/modules.dep" | tr -d ':' | tr ' ' '\n'
done | sort -u)
for m in $needed; do
  mkdir -p "$R/$MODDIR/$(dirname "$m")"
  cp "$X/$MODDIR/$m" "$R/$MODDIR/$m"
done
cp "$X/$MODDIR/modules.builtin" "$R/$MODDIR/" 2>/dev/null || true
"$BUSYBOX" depmod -b "$R" "$release"

# --- GUEST INIT ---------------------------------------------------------------------
cat >"$R/init" <<'EOF'
#!/bin/sh
# PID 1 of a vnic qemu guest (scripts/vm/build-image.sh). Configures eth0 from
# the kernel command line, then keeps the QEMU guest agent running, through
# which the host runs commands (vnic vm exec) and sets TCP settings.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
say() { echo "vnic-guest: $*" >/dev/console; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
modprobe -a virtio_pci virtio_net virtio_console tcp_bbr || say "modprobe failed"
hostname vnic-guest
ip link set lo up
IP4="" IP6="" SYSCTLS="" NICS=""
for word in $(cat /proc/cmdline); do
  case "$word" in
    vnic.ipv4=*) IP4=${word#vnic.ipv4=} ;;
    vnic.ipv6=*) IP6=${word#vnic.ipv6=} ;;
    vnic.sysctl=*) SYSCTLS=${word#vnic.sysctl=} ;;
    vnic.nic=*) NICS="$NICS ${word#vnic.nic=}" ;;
  esac
done
# Addresses are unique by construction (vnic allocates them): no duplicate
# address detection, so IPv6 is usable at once.
echo 0 >/proc/sys/net/ipv6/conf/default/accept_dad
for _ in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.05; done
[ -e /sys/class/net/eth0 ] || say "no eth0"
echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad
for kv in $(echo "$SYSCTLS" | tr ',' ' '); do
  sysctl -q -w "$kv" || say "sysctl $kv failed"
done
[ -n "$IP4" ] && ip addr add "$IP4" dev eth0
[ -n "$IP6" ] && ip -6 addr add "$IP6" dev eth0
ip link set eth0 up
# Per-packet impairments of the guest's egress need single frames, not
# segmentation-offload super-packets (the host side decides per frame).
if grep -qw vnic.offload=off /proc/cmdline; then
  ethtool -K eth0 tso off gso off || say "turning offload off failed"
fi
# The other NICs, each found by its MAC (the kernel names NICs in probe order,
# which follows QEMU's, but the MAC is what vnic knows) and named as vnic says.
nic_by_mac() {
  for dev in /sys/class/net/*; do
    [ "$(cat "$dev/address" 2>/dev/null)" = "$1" ] && { echo "${dev##*/}"; return; }
  done
}
for spec in $NICS; do
  IFS=, read -r name mac ip4 ip6 offload <<SPEC
$spec
SPEC
  dev=""
  for _ in $(seq 50); do dev=$(nic_by_mac "$mac"); [ -n "$dev" ] && break; sleep 0.05; done
  [ -n "$dev" ] || { say "no NIC with MAC $mac for $name"; continue; }
  [ "$dev" = "$name" ] || ip link set dev "$dev" name "$name" || say "cannot name $dev $name"
  echo 0 >"/proc/sys/net/ipv6/conf/$name/accept_dad"
  ip addr add "$ip4" dev "$name"
  ip -6 addr add "$ip6" dev "$name"
  ip link set "$name" up
  if [ "$offload" = off ]; then
    ethtool -K "$name" tso off gso off || say "turning offload off on $name failed"
  fi
done
QGA=""
for port in /sys/class/virtio-ports/*; do
  [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && QGA=/dev/${port##*/}
done
say "ready eth0 $(cat /sys/class/net/eth0/address) $IP4 $IP6"
[ -n "$QGA" ] || { say "no guest agent port"; exec sleep 2147483647; }
# PID 1 must not exit; an agent that dies is started again.
while true; do
  qemu-ga --method=virtio-serial --path="$QGA" --statedir=/run --pidfile=/run/qemu-ga.pid
  say "qemu-ga exited ($?); restarting"
  sleep 1
done
EOF
chmod 755 "$R/init"

# --- result ---------------------------------------------------------------------------
mkdir -p "$STAGE/out"
cp "$X/boot/vmlinuz-$release" "$STAGE/out/vmlinuz"
(cd "$R" && find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc 2>/dev/null) | gzip -1 >"$STAGE/out/initrd.img"
{
  cat "$STAGE/versions"
  echo "kernel=$release"
  echo "initrd_bytes=$(stat -c %s "$STAGE/out/initrd.img")"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "build_seconds=$((SECONDS - started))"
} >"$STAGE/out/info"
touch "$STAGE/out/complete"
rm -rf --one-file-system -- "$OUT"
mv "$STAGE/out" "$OUT"
for d in "$CACHE"/*/; do
  d=${d%/}
  [ "$d" != "$OUT" ] && [ -f "$d/complete" ] && log "older image (safe to remove): $d"
done
log "built $OUT (kernel $release) in $((SECONDS - started)) s"
echo "$OUT"
