"""A QEMU guest's command lines, CPU flags, /proc/net parsing and the image cache, from tables.

No root, no QEMU: :mod:`vnic.plan.guest` is pure, and the parsers of
:mod:`vnic.dataplane.qemu` and :mod:`vnic.dataplane.vmexec` are fed sample texts.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vnic.dataplane import qemu, vmexec
from vnic.errors import DataplaneError
from vnic.plan.guest import (
    AGENT_PORT,
    NETDEV_ID,
    NIC_ID,
    GuestSpec,
    RunFiles,
    kernel_command_line,
    owner_of_cmdline,
    qemu_argv,
)

SPEC = GuestSpec(
    session="lab",
    vm="g1",
    tap="vh3",
    mac="52:54:00:12:34:56",
    ipv4="10.0.1.2/24",
    ipv6="fd00:0:0:1::2/64",
)
RUN = RunFiles(Path("/run/vnic/qemu/lab/g1"))
KERNEL = Path("/var/cache/vnic/vm/k/vmlinuz")
INITRD = Path("/var/cache/vnic/vm/k/initrd.img")


def guest_view(cmdline: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """What the guest's /init makes of ``cmdline``: it splits /proc/cmdline on whitespace,
    takes each ``vnic.*=`` word, splits ``vnic.sysctl=`` on commas and hands each
    ``key=value`` to ``sysctl -w`` (which splits at the first ``=``)."""
    words = {}
    for word in cmdline.split():
        key, sep, value = word.partition("=")
        if key.startswith("vnic.") and sep:
            words[key] = value
    sysctls = []
    for kv in words.get("vnic.sysctl", "").split(","):
        if kv:
            key, _, value = kv.partition("=")
            sysctls.append((key, value))
    return words, sysctls


def with_(**changes: Any) -> GuestSpec:
    return dataclasses.replace(SPEC, **changes)


# ----------------------------------------------------------------------------- kernel_command_line


@pytest.mark.parametrize(
    ("changes", "vnic_words", "sysctls"),
    [
        (
            {},
            {"vnic.ipv4": "10.0.1.2/24", "vnic.ipv6": "fd00:0:0:1::2/64"},
            [],
        ),
        (
            {"sysctls": (("net.ipv4.tcp_sack", "0"),)},
            {
                "vnic.ipv4": "10.0.1.2/24",
                "vnic.ipv6": "fd00:0:0:1::2/64",
                "vnic.sysctl": "net.ipv4.tcp_sack=0",
            },
            [("net.ipv4.tcp_sack", "0")],
        ),
        (
            {
                "sysctls": (
                    ("net.ipv4.tcp_ecn", "1"),
                    ("net.ipv4.tcp_congestion_control", "bbr"),
                ),
                "offload": False,
            },
            {
                "vnic.ipv4": "10.0.1.2/24",
                "vnic.ipv6": "fd00:0:0:1::2/64",
                "vnic.sysctl": "net.ipv4.tcp_ecn=1,net.ipv4.tcp_congestion_control=bbr",
                "vnic.offload": "off",
            },
            [("net.ipv4.tcp_ecn", "1"), ("net.ipv4.tcp_congestion_control", "bbr")],
        ),
        (
            {"ipv4": "192.168.7.9/30", "ipv6": "fd12::7/127", "offload": False},
            {"vnic.ipv4": "192.168.7.9/30", "vnic.ipv6": "fd12::7/127", "vnic.offload": "off"},
            [],
        ),
    ],
)
def test_the_guest_init_reads_back_what_the_spec_says(
    changes: dict[str, Any], vnic_words: dict[str, str], sysctls: list[tuple[str, str]]
) -> None:
    line = kernel_command_line(with_(**changes))
    assert guest_view(line) == (vnic_words, sysctls)
    words = line.split()
    # The init greps for the whole word vnic.offload=off; offload on means no such word.
    assert ("vnic.offload=off" in words) == (changes.get("offload") is False)
    assert "console=ttyS0" in words and "panic=-1" in words


def test_all_sysctls_travel_in_one_word_in_order() -> None:
    pairs = (("net.ipv4.tcp_sack", "0"), ("net.ipv4.tcp_timestamps", "0"), ("a.b", "c"))
    words = kernel_command_line(with_(sysctls=pairs)).split()
    sysctl_words = [w for w in words if w.startswith("vnic.sysctl=")]
    assert sysctl_words == ["vnic.sysctl=net.ipv4.tcp_sack=0,net.ipv4.tcp_timestamps=0,a.b=c"]


def test_extra_words_come_last() -> None:
    words = kernel_command_line(with_(extra_append=("debug", "initcall_debug"))).split()
    assert words[-2:] == ["debug", "initcall_debug"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("net.ipv4.tcp_rmem", "4096 131072 6291456"),  # a space would split the word
        ("net.ipv4.tcp_congestion_control", "bbr,cubic"),  # a comma would split the list
        ("net.ipv4.tcp_ecn", "1=2"),  # the guest's sysctl -w would set ecn to "1=2"
        ("net ipv4", "1"),
        ("a,b", "1"),
        ("net.ipv4.tcp_sack", "\t0"),
    ],
)
def test_values_the_command_line_cannot_carry_are_refused(key: str, value: str) -> None:
    with pytest.raises(ValueError, match="cannot be passed"):
        kernel_command_line(with_(sysctls=(("net.ipv4.tcp_sack", "1"), (key, value))))


_SAFE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=20)


@given(st.lists(st.tuples(_SAFE, _SAFE), max_size=6), st.booleans())
def test_any_safe_sysctls_reach_the_guest_unchanged(
    pairs: list[tuple[str, str]], offload: bool
) -> None:
    line = kernel_command_line(with_(sysctls=tuple(pairs), offload=offload))
    words, sysctls = guest_view(line)
    assert sysctls == pairs
    assert words.get("vnic.offload") == (None if offload else "off")


# ----------------------------------------------------------------------------- qemu_argv


def options(argv: list[str]) -> dict[str, list[str]]:
    """QEMU's ``-flag value`` pairs (and bare flags, with no value) by flag, in order."""
    bare = {"-nodefaults", "-no-user-config", "-no-reboot", "-daemonize"}
    out: dict[str, list[str]] = {}
    i = 1
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("-"), f"{flag!r} is not an option"
        if flag in bare:
            out.setdefault(flag, [])
            i += 1
        else:
            out.setdefault(flag, []).append(argv[i + 1])
            i += 2
    return out


def props(value: str) -> tuple[str, dict[str, str]]:
    """``driver,key=value,...`` as (driver, {key: value})."""
    head, *rest = value.split(",")
    return head, dict(kv.split("=", 1) for kv in rest)


def test_the_nic_is_virtio_on_the_spec_tap_with_the_spec_mac() -> None:
    opts = options(qemu_argv(SPEC, KERNEL, INITRD, RUN))
    ((kind, netdev),) = [props(v) for v in opts["-netdev"]]
    assert kind == "tap"
    assert netdev["ifname"] == "vh3"
    assert (netdev["script"], netdev["downscript"]) == ("no", "no")  # QEMU configures nothing
    nics = [p for d, p in (props(v) for v in opts["-device"]) if d == "virtio-net-pci"]
    # The device (which QMP's set_link and query-rx-filter name) on the tap back end.
    assert nics == [{"id": NIC_ID, "netdev": netdev["id"], "mac": "52:54:00:12:34:56"}]
    assert netdev["id"] == NETDEV_ID != NIC_ID


def test_the_agent_port_and_every_socket_and_file_are_in_the_run_directory() -> None:
    run = RunFiles(Path("/tmp/vq/s/v"))
    opts = options(qemu_argv(SPEC, KERNEL, INITRD, run))
    (chardev,) = opts["-chardev"]
    kind, chardev_props = props(chardev)
    assert kind == "socket" and Path(chardev_props["path"]) == run.agent
    ports = [p for d, p in (props(v) for v in opts["-device"]) if d == "virtserialport"]
    assert ports == [{"chardev": chardev_props["id"], "name": AGENT_PORT}]
    ((qmp_kind, qmp_props),) = [props(v) for v in opts["-qmp"]]
    assert qmp_kind == f"unix:{run.qmp}"
    assert qmp_props["server"] == "on" and qmp_props["wait"] == "off"
    assert opts["-serial"] == [f"file:{run.console}"]
    assert opts["-pidfile"] == [str(run.pid)]
    assert "-daemonize" in opts
    for path in (run.agent, run.qmp, run.console, run.pid):
        assert path.parent == run.directory


@pytest.mark.parametrize(("accel", "cpu"), [("kvm", "host"), ("tcg", "max")])
def test_the_accelerator_picks_the_cpu_model(accel: str, cpu: str) -> None:
    opts = options(qemu_argv(with_(accel=accel), KERNEL, INITRD, RUN))
    assert (opts["-accel"], opts["-cpu"]) == ([accel], [cpu])


def test_the_name_is_the_owner_tag_and_reads_back() -> None:
    for session, vm in (("lab", "g1"), ("t9ae5de15", "a-b.c")):
        argv = qemu_argv(with_(session=session, vm=vm), KERNEL, INITRD, RUN)
        assert options(argv)["-name"] == [f"vnic:{session}/{vm}"]
        assert owner_of_cmdline(argv) == f"vnic:{session}/{vm}"


def test_boot_files_size_and_command_line() -> None:
    spec = with_(memory_mib=256, cpus=2, offload=False)
    argv = qemu_argv(spec, KERNEL, INITRD, RUN, binary="/opt/qemu/bin/qemu-system-x86_64")
    opts = options(argv)
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert (opts["-kernel"], opts["-initrd"]) == ([str(KERNEL)], [str(INITRD)])
    assert (opts["-m"], opts["-smp"]) == (["256"], ["2"])
    assert opts["-append"] == [kernel_command_line(spec)]
    assert "-no-reboot" in opts and opts["-display"] == ["none"]


# ----------------------------------------------------------------------------- owner_of_cmdline


@pytest.mark.parametrize(
    ("argv", "owner"),
    [
        (["qemu-system-x86_64", "-name", "vnic:lab/g1", "-m", "128"], "vnic:lab/g1"),
        (["/usr/bin/qemu-system-x86_64", "-m", "128", "-name", "vnic:s/v"], "vnic:s/v"),
        (["qemu-system-x86_64", "-m", "128"], None),
        (["qemu-system-x86_64", "-name"], None),  # cut short: no value
        ([], None),
        (["qemu-system-x86_64", "-append", "-name x"], None),  # a word, not the option
    ],
)
def test_owner_of_cmdline(argv: list[str], owner: str | None) -> None:
    assert owner_of_cmdline(argv) == owner


# ----------------------------------------------------------------------------- cpu flags

INTEL = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon pebs bts rep_good nopl xtopology pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16
vmx flags\t: vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad ept_1gb
bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs taa itlb_multihit

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep vmx smx est
"""

AMD = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext perfctr_core npt lbrv svm_lock nrip_save
"""

# A guest of a hypervisor that does not pass virtualisation on (this machine's kind):
# vmmcall and svm_lock-like words, "hypervisor", but neither vmx nor svm.
NESTED_OFF = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 (vmx-capable host)
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx lm constant_tsc rep_good nopl cpuid pni hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a vmmcall svm_lock fsgsbase avx512f
bugs\t\t: sysret_ss_attrs null_seg spectre_v1 spectre_v2 svm_hidden vmx_hidden
"""

# Only the flags line counts: "vmx flags" and "bugs" lines are not flags.
FLAGS_LINE_ONLY = """\
processor\t: 0
flags\t\t: fpu vme de pse tsc msr hypervisor
vmx flags\t: vnmi preemption_timer
"""


@pytest.mark.parametrize(
    ("cpuinfo", "has"),
    [
        (INTEL, True),
        (AMD, True),
        (NESTED_OFF, False),
        (FLAGS_LINE_ONLY, False),
        ("", False),
        ("flags\t\t: svm\n", True),
        ("flags\t\t: fpu vmx\n", True),
        ("flags\t\t: fpu vmxe svmx\n", False),
    ],
)
def test_cpu_has_virtualisation(cpuinfo: str, has: bool) -> None:
    assert qemu.cpu_has_virtualisation(cpuinfo) is has


# ----------------------------------------------------------------------------- /proc/net

TCP_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
TCP = f"""\
{TCP_HEADER}
   0: 00000000:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20101 1 0000000000000000 100 0 0 10 0
   2: 0201000A:1451 0101000A:A2C4 01 00000000:00000000 02:000AFC7F 00000000     0        0 31338 2 0000000000000000 20 4 30 10 -1
   3: 0201000A:C350 0101000A:1F90 01 00000000:00000000 00:00000000 00000000     0        0 31339 1 0000000000000000 20 4 30 10 -1
   4: 0201000A:9C40 0101000A:1451 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0840 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 40001 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000201000A:1452 0000000000000000FFFF00000101000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 40002 1 0000000000000000 20 4 30 10 -1
   2: 00000000000000000000000001000000:FFFF 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 40003 1 0000000000000000 100 0 0 10 0
"""
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  123: 00000000:0840 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 50001 2 0000000000000000 0
  456: 0201000A:E290 0101000A:0035 01 00000000:00000000 00:00000000 00000000     0        0 50002 2 0000000000000000 0
  789: 00000000:1451 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 50003 2 0000000000000000 0
"""


@pytest.mark.parametrize(
    ("text", "protocol", "ports"),
    [
        # 0x1451 = 5201 (iperf3) and 0x16 = 22 listen; established and TIME_WAIT
        # sockets (local 5201 too, and ephemeral 50000, 40000) do not count.
        (TCP, "tcp", {5201, 22}),
        # 0x840 = 2112 (irtt) on ::, 0xFFFF on ::1; the v4-mapped connection does not count.
        (TCP6, "tcp", {2112, 65535}),
        # what `cat /proc/net/tcp /proc/net/tcp6` prints: two tables, two headers
        (TCP + TCP6, "tcp", {5201, 22, 2112, 65535}),
        # UDP: bound sockets (state 07) count, a connected one (01, a DNS client) does not
        (UDP, "udp", {2112, 5201}),
        # TCP text read as UDP: no LISTEN socket has state 07
        (TCP, "udp", set()),
        (TCP_HEADER + "\n", "tcp", set()),
        ("", "tcp", set()),
    ],
)
def test_listening_ports(text: str, protocol: str, ports: set[int]) -> None:
    assert vmexec.listening_ports(text, protocol) == ports


def test_listening_ports_default_to_tcp() -> None:
    assert vmexec.listening_ports(TCP) == {5201, 22}


# ----------------------------------------------------------------------------- the image cache


def _fake_builder(tmp_path: Path) -> tuple[Path, list[Path]]:
    tools = []
    for name, content in (("iperf3", b"\x7fELF iperf3"), ("ping", b"\x7fELF ping\x00\xff")):
        tool = tmp_path / "bin" / name
        tool.parent.mkdir(exist_ok=True)
        tool.write_bytes(content)
        tools.append(tool)
    script = tmp_path / "build-image.sh"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f"GUEST_TOOLS=({' '.join(str(t) for t in tools)})\n"
        "GUEST_MODULES=(virtio_pci)\n"
        'KEY=$( (cat "$SELF" "${GUEST_TOOLS[@]}") | sha256sum | cut -c1-16)\n'
    )
    return script, tools


def test_the_image_key_is_the_one_the_build_script_computes(tmp_path: Path) -> None:
    script, tools = _fake_builder(tmp_path)
    shell = subprocess.run(
        ["bash", "-c", '(cat "$@") | sha256sum | cut -c1-16', "key", str(script), *map(str, tools)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert qemu.image_key(script) == shell.stdout.strip()
    tools[1].write_bytes(b"\x7fELF ping, upgraded")  # a new tool version: a new image
    assert qemu.image_key(script) != shell.stdout.strip()
    tools[0].unlink()  # the script would refuse to build
    assert qemu.image_key(script) is None
    assert qemu.image_key(tmp_path / "missing.sh") is None


def test_the_real_build_script_has_a_tool_list() -> None:
    assert qemu.BUILD_SCRIPT.is_file()
    text = qemu.BUILD_SCRIPT.read_text()
    assert 'KEY=$( (cat "$SELF" "${GUEST_TOOLS[@]}") | sha256sum | cut -c1-16)' in text
    # None only if a tool is missing on this host (then nothing is cached either).
    assert qemu.image_key() is not None or qemu.cached_image() is None


def _build(directory: Path, *, complete: bool = True, initrd: bool = True) -> None:
    directory.mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(b"kernel")
    if initrd:
        (directory / "initrd.img").write_bytes(b"initrd")
    (directory / "info").write_text("kernel=6.1.0-test\nbuild_seconds=3\n")
    if complete:
        (directory / "complete").touch()


def test_cached_image_finds_only_a_finished_build_of_the_current_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, _ = _fake_builder(tmp_path)
    key = qemu.image_key(script)
    assert key is not None
    cache = tmp_path / "cache"
    monkeypatch.setattr(qemu, "BUILD_SCRIPT", script)
    monkeypatch.setenv("VNIC_VM_CACHE", str(cache))
    monkeypatch.delenv("VNIC_VM_IMAGE", raising=False)
    assert qemu.image_cache() == cache
    assert qemu.cached_image() is None  # nothing built
    _build(cache / "0123456789abcdef")  # an older script's build
    assert qemu.cached_image() is None
    _build(cache / key, complete=False)  # a build in progress (or interrupted)
    assert qemu.cached_image() is None
    (cache / key / "complete").touch()
    found = qemu.cached_image()
    assert found is not None and found.directory == cache / key
    assert found.info() == {"kernel": "6.1.0-test", "build_seconds": "3"}


def test_vnic_vm_image_names_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VNIC_VM_CACHE", str(tmp_path / "empty-cache"))
    given = tmp_path / "mine"
    monkeypatch.setenv("VNIC_VM_IMAGE", str(given))
    assert qemu.cached_image() is None  # not there yet
    _build(given, complete=False, initrd=False)
    assert qemu.cached_image() is None  # no initramfs
    (given / "initrd.img").write_bytes(b"initrd")
    found = qemu.cached_image()  # a given image needs no `complete` file
    assert found is not None and (found.kernel, found.initrd) == (
        given / "vmlinuz",
        given / "initrd.img",
    )


def test_the_default_cache_is_under_var_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VNIC_VM_CACHE", raising=False)
    assert qemu.image_cache() == Path("/var/cache/vnic/vm")


# ----------------------------------------------------------------------------- the accelerator


@pytest.mark.parametrize("forced", ["kvm", "tcg"])
def test_a_forced_accelerator_needs_no_image(forced: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VNIC_QEMU_ACCEL", forced)
    monkeypatch.setattr(qemu, "image", _no_build)
    assert qemu.known_accelerator() == qemu.Accelerator(forced, "forced by VNIC_QEMU_ACCEL")


def test_a_wrong_forced_accelerator_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VNIC_QEMU_ACCEL", "hvf")
    with pytest.raises(DataplaneError, match="VNIC_QEMU_ACCEL: got 'hvf'; expected kvm or tcg"):
        qemu.known_accelerator()


def test_without_an_image_a_trial_boot_is_left_undecided(monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm: TCG without a trial boot")
    monkeypatch.delenv("VNIC_QEMU_ACCEL", raising=False)
    monkeypatch.setattr(qemu, "cpu_has_virtualisation", lambda cpuinfo: True)
    monkeypatch.setattr(qemu, "cached_image", lambda: None)
    monkeypatch.setattr(qemu, "image", _no_build)
    assert qemu.known_accelerator() is None


def test_this_hosts_cpu_flags_decide_without_a_trial_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VNIC_QEMU_ACCEL", raising=False)
    monkeypatch.setattr(qemu, "image", _no_build)
    if Path("/dev/kvm").exists() and qemu.cpu_has_virtualisation(Path("/proc/cpuinfo").read_text()):
        pytest.skip("vmx/svm here: a trial boot decides")
    found = qemu.known_accelerator()
    assert found is not None and found.name == "tcg"


def _no_build() -> qemu.Image:
    raise AssertionError("the guest image must not be built here")
