"""The short tables ``vnic bench`` prints of a benchmark's JSON result (the JSON is the
record; these are for reading). Each function takes the result as the benchmark returned
it and returns a rich table or text lines; ``vnic bench change`` keeps its table beside
its benchmark (:func:`vnic.lab.bench.change.table`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from rich.table import Table


def rates_table(result: Mapping[str, Any]) -> Table:
    """Shaping fidelity: configured vs measured rate per case, judged when the rows are."""
    rows = result["rows"]
    judged = any("pass" in r for r in rows)
    title = "shaping fidelity (iperf3)"
    if result.get("driver") == "qemu":
        title += f" of a QEMU guest ({result['accelerator']}) against a netns peer"
    table = Table(
        "case", "configured", "measured (frames)", "ratio", "lost / reordered", title=title
    )
    if judged:
        table.add_column(f"±{result['tolerance'] * 100:g} %")
    for r in rows:
        extra = f"{r['lost_percent']}% / {r['out_of_order']}" if "lost_percent" in r else ""
        measured = "—" if r["measured_bps"] is None else f"{r['measured_bps'] / 1e6:.3f} Mbit/s"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f}"
        cells = [r["case"], f"{r['configured_bps'] / 1e6:g} Mbit/s", measured, ratio, extra]
        if judged:
            verdict = "met" if r.get("pass") else "MISSED"
            if "error" in r:
                verdict += f": {r['error'][:60]}"
            elif "limited_by" in r:
                verdict += f": {r['limited_by']}"
            cells.append(verdict)
        table.add_row(*cells)
    return table


def note_lines(result: Mapping[str, Any]) -> Iterator[str]:
    """The notes of a benchmark result: its ceiling and what it skipped, and why."""
    ceiling = result.get("ceiling")
    if ceiling:
        moved = [
            f"{key.removesuffix('_bps').replace('_', ' ')} {value / 1e6:.0f} Mbit/s"
            for key, value in ceiling.items()
            if key.endswith("_bps") and value is not None
        ]
        yield f"unshaped guest (its ceiling): {', '.join(moved)}"
    reasons: dict[str, list[str]] = {}
    for s in result.get("skipped", []):
        reasons.setdefault(s["reason"], []).append(s["case"])
    for reason, cases in reasons.items():
        yield f"skipped {', '.join(cases)}: {reason}"


def _loss_with_interval(row: Mapping[str, Any]) -> str:
    """A measured loss rate with its 95 % interval, in percent."""
    lo, hi = row["interval_95_percent"]
    return f"{row['measured_percent']:.3f} % [{lo:.3f}, {hi:.3f}]"


def impairments_table(result: Mapping[str, Any]) -> Table:
    """Delay, jitter and loss: configured vs measured per cell, with the target's verdict."""
    table = Table(
        "case",
        "configured",
        "measured",
        "detail",
        "target",
        title=f"delay, jitter and loss (engine: {result['engine']})"
        + (" through a QEMU guest" if result.get("driver") == "qemu" else ""),
    )
    for r in result["rows"]:
        kind = r["kind"]
        configured = measured = detail = ""
        if kind == "baseline" and "median_rtt_us" in r:
            measured = f"{r['median_rtt_us']} µs RTT"
            detail = f"p99 {r['p99_rtt_us']} µs, n {r['samples']}"
        elif kind == "baseline":
            measured = f"{r['median_one_way_us']} µs one way"
        elif kind == "rtt_delay":
            configured = f"{r['configured_ms']} ms"
            measured = f"{r['measured_ms']:.3f} ms RTT added"
            detail = f"error {r['median_error_us']} µs, p99-p50 {r['p99_minus_median_us']} µs, n {r['samples']}"
        elif kind == "udp_loss":
            configured = f"{r['configured_percent']:g} %"
            measured = _loss_with_interval(r)
            detail = f"{r['lost']} of {r['packets']}, expected {r['expected_count_95']}"
        elif kind == "delay":
            configured, measured = f"{r['configured_ms']} ms", f"{r['measured_ms']:.3f} ms"
            detail = f"error {r['median_error_us']} µs, p99-p50 {r['p99_minus_median_us']} µs, reordered {r['reordered']}"
        elif kind == "jitter":
            configured = f"σ {r['configured_sigma_ms']:.3f} ms"
            measured = f"σ {r['measured_sigma_ms']:.3f} ms ({r['ratio']:.3f})"
            detail = f"n {r['samples']}, skew {r['skewness']}, reordered {r['reordered']}"
        elif kind == "loss":
            configured = f"{r['configured_percent']:g} %, bursts {r['configured_burst']:g}"
            measured = _loss_with_interval(r)
            detail = f"mean burst {r['mean_burst']}, n {r['packets']}"
            if "engine_lost_percent" in r:
                detail += (
                    f"; engine decided {r['engine_lost_percent']:.3f} %, "
                    f"measuring path lost {r['measuring_path_lost']}"
                )
        elif kind == "order":
            measured = f"{r['reordered']} reordered of {r['received']}"
        elif kind == "seed":
            measured = f"identical: {r['identical']} ({r['lost_first']} / {r['lost_second']} lost)"
        elif kind == "throughput":
            configured = f"{r['configured_bps'] / 1e6:g} Mbit/s"
            measured = f"{r['measured_bps'] / 1e6:.2f} Mbit/s ({r['ratio']:.3f})"
        elif kind == "engine":
            if "offered_pps" in r:
                configured = f"{r['offered_pps']} pkt/s"
                measured = f"{r['received_pps']} pkt/s"
                detail = f"late {r['late_share']}, {r['engine_cpu_us_per_packet']} µs CPU/pkt"
            else:
                measured = f"{r['measured_bps'] / 1e9:.2f} Gbit/s"
                detail = f"engine CPU {r['engine_cpu_share']}, late {r['late_share']}"
        elif kind == "mobile":
            configured = r.get("configured", "")
            if "median_ms" in r:
                measured = f"{r['median_ms']} ms, σ {r['sigma_ms']} ms, loss {r['loss_percent']} %"
                detail = f"loss 95% {r['loss_interval_95_percent']}, reordered {r['reordered']}"
            else:
                measured = f"{r['egress_bps'] / 1e6:.2f} / {r['ingress_bps'] / 1e6:.2f} Mbit/s"
        verdict = {True: "met", False: "MISSED"}.get(r.get("pass"), "")
        table.add_row(r["case"], configured, measured, detail, verdict)
    return table


def qemu_launch_table(result: Mapping[str, Any]) -> Table:
    """Launch of QEMU guests: one at a time (launch, first ping, destroy), then at once."""
    table = Table(
        "measure",
        "p50 s",
        "p99 s",
        "each (s)",
        "target",
        title=f"launch of QEMU guests ({result['accelerator']})",
    )
    seq = result["sequential"]
    for name, key in (
        ("launch", "launch"),
        ("launch + first ping", "ready"),
        ("destroy", "destroy"),
    ):
        target = ""
        if key == "launch":
            target = f"≤ {seq['target_s']:g} s: " + ("met" if seq["pass"] else "MISSED")
        table.add_row(
            f"{name}, one at a time",
            str(seq[key]["p50_s"]),
            str(seq[key]["p99_s"]),
            " ".join(f"{t:.2f}" for t in seq[f"{key}_s"]),
            target,
        )
    for name, key in (
        ("one session", "concurrent_one_session"),
        ("separate sessions", "concurrent_separate_sessions"),
    ):
        c = result[key]
        table.add_row(
            f"{c['guests']} at once, {name} (wall {c['wall_s']:.2f} s)",
            str(c["p50_s"]),
            str(c["p99_s"]),
            " ".join(f"{t:.2f}" for t in c["per_guest_s"].values()),
            f"no error, {c['answering_ping']}/{c['guests']} answer ping: "
            + ("met" if not c["errors"] and c["answering_ping"] == c["guests"] else "MISSED"),
        )
    return table


def launch_table(result: Mapping[str, Any]) -> Table:
    """Launch of netns VMs: every metric of the result, as it is."""
    table = Table("metric", "value", title=f"launch of {result['vms']} shaped VMs")
    for k, v in result.items():
        if k != "benchmark":
            table.add_row(k, str(v))
    return table


def api_table(result: Mapping[str, Any]) -> Table:
    """The control plane through HTTP: p50/p99/max per measure, against its target."""
    table = Table("measure", "p50 ms", "p99 ms", "max ms", "n", "target")
    rec = result["records"]
    rows = [
        (f"explain ({rec['vms']} VMs)", rec["explain"], "p99 < 20 ms"),
        (f"profile list ({rec['profiles']})", rec["profile_list"], "< 50 ms"),
        ("render /metrics, 1000 vNICs", result["metrics_render"], "< 500 ms"),
    ]
    if "launch" in result:
        lau = result["launch"]
        rows.append(
            (f"launch, {lau['concurrent_requests']} at once", lau["per_launch"], "no error")
        )
        rows.append(
            (f"scrape /metrics, {lau['concurrent_requests']} real vNICs", lau["metrics_scrape"], "")
        )
    for name, m, target in rows:
        table.add_row(
            name, str(m["p50_ms"]), str(m["p99_ms"]), str(m["max_ms"]), str(m["n"]), target
        )
    return table


def api_lines(result: Mapping[str, Any]) -> Iterator[str]:
    if "launch" in result:
        lau = result["launch"]
        yield f"launch errors: {len(lau['errors'])}; wall {lau['wall_seconds']} s"


def ui_table(r: Mapping[str, Any]) -> Table:
    """The web UI in Chromium: a session page of many VMs against one of a single VM."""
    table = Table("page", "median ms", "renders ms", "target")
    table.add_row(
        f"session of {r['vms']} VMs",
        str(r["median_ms"]),
        " ".join(map(str, r["render_ms"])),
        f"< {r['target_ms']} ms: {'met' if r['pass'] else 'missed'}",
    )
    table.add_row(
        "session of 1 VM", str(r["one_vm_median_ms"]), " ".join(map(str, r["one_vm_render_ms"])), ""
    )
    return table


def load_table(result: Mapping[str, Any]) -> Table:
    """Readers and writers at once: latency of the 2xx answers and answers by status."""
    table = Table("kind", "p50 ms", "p99 ms", "max ms", "ok/s", "answers by status")
    for kind in ("read", "write"):
        rep = result[kind]
        m = rep["ok"] or {"p50_ms": "-", "p99_ms": "-", "max_ms": "-"}
        statuses = " ".join(f"{k}:{v}" for k, v in rep["by_status"].items())
        table.add_row(
            f"{kind} (2xx)",
            str(m["p50_ms"]),
            str(m["p99_ms"]),
            str(m["max_ms"]),
            str(rep["per_second_ok"]),
            statuses,
        )
    return table


def load_lines(
    result: Mapping[str, Any], readers: int, writers: int, seconds: float
) -> Iterator[str]:
    rss, probe = result["rss_kib"], result["health_probe"]
    yield (
        f"health probe (own process, no admission): p50 {probe.get('p50_ms')} ms, "
        f"p99 {probe.get('p99_ms')} ms, {probe['failed']} failed"
    )
    yield (
        f"{readers} readers + {writers} writers, {seconds:g} s; errors other than 429: "
        f"{sum(result['errors_other_than_429'].values())}; server RSS "
        f"{rss['before']} -> {rss['after']} KiB"
    )


def startup_table(result: Mapping[str, Any]) -> Table:
    """Start-up time per command: median seconds and the ratio to ``python -c pass``."""
    table = Table(
        "command",
        "median s",
        "x python -c pass",
        "runs",
        title=f"start-up, {result['runs']} runs each, interleaved",
    )
    for r in result["commands"]:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.1f}"
        median = "—" if r["median_s"] is None else f"{r['median_s']:.3f}"
        table.add_row(r["name"], median, ratio, str(len(r["seconds"])))
    return table


def nics_tables(result: Mapping[str, Any]) -> Iterator[Table]:
    """Several vNICs per VM: each vNIC against its own profile, and launch cost by vNICs."""
    fid = result["fidelity"]
    table = Table("case", "configured", "measured", "ratio / error", "target", title="two vNICs")
    for r in fid["rows"]:
        verdict = "met" if r.get("pass") else "MISSED"
        if r["kind"] == "rate-with-delay":
            table.add_row(
                r["case"],
                f"{r['configured_bps'] / 1e6:g} Mbit/s",
                f"{r['measured_bps'] / 1e6:.3f} Mbit/s",
                f"{r['ratio']:.3f}",
                f"one vNIC alone {r['one_vnic_alone_ratio']:.3f} (×{r['vs_one_vnic']:.3f})",
            )
        elif r["kind"] == "rate":
            table.add_row(
                r["case"],
                f"{r['configured_bps'] / 1e6:g} Mbit/s",
                f"{r['measured_bps'] / 1e6:.3f} Mbit/s",
                f"{r['ratio']:.3f}",
                f"±2 %: {verdict}",
            )
        else:
            table.add_row(
                r["case"],
                f"{r['configured_ms']} ms",
                f"{r['measured_ms']:.3f} ms",
                f"{r['median_error_us']:+.0f} µs",
                f"max(100 µs, 2 %): {verdict}",
            )
    yield table
    la = result["launch"]
    launch = Table("launch", "seconds", "ratio", "target", title="launch cost by vNICs")
    launch.add_row("1 vNIC (median)", f"{la['one_vnic_launch_s']:.3f}", "", "")
    launch.add_row(
        "4 vNICs (median)",
        f"{la['four_vnic_launch_s']:.3f}",
        f"{la['four_over_one']:.2f}×",
        "≤ 4×: " + ("met" if la["four_over_one_pass"] else "MISSED"),
    )
    launch.add_row(f"{la['vms']} VMs × 1 vNIC", f"{la['batch_one_vnic_s']:.2f}", "", "")
    launch.add_row(
        f"{la['vms']} VMs × 2 vNICs",
        f"{la['batch_two_vnic_s']:.2f}",
        f"{la['two_over_one']:.2f}×",
        "≤ 2×: " + ("met" if la["two_over_one_pass"] else "MISSED"),
    )
    yield launch


def hosts_table(r: Mapping[str, Any]) -> Table:
    """Many hosts: change latency, convergence, scale, the simulation, cross-host."""
    table = Table("part", "measured", "target", title="vnic bench hosts (3 emulated hosts)")
    if "error" not in r.get("change", {"error": ""}):
        c = r["change"]
        for key, label in (("spread", "over 3 hosts"), ("single_host", "on 1 host")):
            s = c[key]
            table.add_row(
                f"profile change, {c['vms']} VMs {label}",
                f"p50 {s['p50_s']:.3f} s, p99 {s['p99_s']:.3f} s, max {s['max_s']:.3f} s",
                "",
            )
        met = "met" if c["p99_ratio"] <= c["target_ratio"] else "MISSED"
        table.add_row("p99 spread / single host", f"{c['p99_ratio']:.2f}×", f"≤ 2×: {met}")
        k = c["kernel_check"]
        table.add_row(
            f"HTB of {k['vm']} on {k['host']}",
            "new rate" if k["rate_30mbit_in_htb"] else "OLD RATE",
            "",
        )
    if "error" not in r.get("convergence", {"error": ""}):
        v = r["convergence"]
        for key, label in (
            ("partition_heal_s", "converged after a partition heals"),
            ("manager_sigkill_failover_s", "replica SIGKILLed: converged on the other"),
            ("manager_sigkill_restart_s", "replica SIGKILLed: converged after its start"),
        ):
            if key not in v:
                continue
            met = "met" if v[key] <= v["target_s"] else "MISSED"
            table.add_row(label, f"{v[key]:.2f} s", f"≤ {v['target_s']:g} s: {met}")
    if "error" not in r.get("scale", {"error": ""}):
        s = r["scale"]
        cpu = s["agent_cpu_s"]
        table.add_row(
            f"launch {s['vms']} VMs ({s['parallel']} at once)", f"{s['launch_s']:.2f} s", ""
        )
        table.add_row("full resync (agents restarted)", f"{s['resync_s']:.2f} s", "")
        table.add_row(
            "session down, nothing left", f"{s['down_s']:.2f} s, left {len(s['left'])}", ""
        )
        for phase in ("launch", "resync", "down"):
            shown = ", ".join(f"{h} {v:.2f}" for h, v in cpu[phase].items())
            table.add_row(f"agent CPU s, {phase}", shown, "")
        rss = ", ".join(f"{h} {v:.0f}" for h, v in s["agent_peak_rss_mib"].items())
        table.add_row("agent peak RSS MiB", rss, "")
    if "error" not in r.get("simulation", {"error": ""}):
        m = r["simulation"]
        ch = m["change"]
        table.add_row(
            f"sim: {m['agents']} agents register at once", f"{m['registration_storm_s']:.2f} s", ""
        )
        table.add_row(f"sim: launch {m['vms']} VMs", f"{m['launch_s']:.1f} s", "")
        if "idle_manager_cpu_s_per_s" in m:
            idle = m["idle_manager_cpu_s_per_s"]
            table.add_row("sim: replicas' CPU with nothing changing", f"{idle:.2f} s/s", "")
        table.add_row(
            f"sim: change reaching {m['vnics']} vNICs",
            f"p50 {ch['p50_s']:.2f} s, all {ch['converged_s']:.2f} s, "
            f"{ch['change_log_rows']} log rows",
            "",
        )
        table.add_row(
            "sim: manager CPU per 1 000 vNICs", f"{ch['manager_cpu_s_per_1000_vnics']:.2f} s", ""
        )
        k = m["replica_killed"]
        table.add_row(
            "sim: replica killed, restart to converged", f"{k['restart_to_converged_s']:.2f} s", ""
        )
    x = r.get("cross_host_fidelity", {})
    for row in x.get("rows", []):
        met = "met" if abs(row["cross_ratio"] - 1) <= 0.02 else "MISSED"
        table.add_row(
            f"TCP {row['direction']} across hosts, {row['rate_mbit']} Mbit/s",
            f"{row['cross_host_bps'] / 1e6:.3f} Mbit/s = {row['cross_ratio']:.3f} "
            f"(1 host: {row['same_ratio']:.3f}, ×{row['cross_over_same']:.3f})",
            f"±2 %: {met}",
        )
    if "unshaped_ceiling" in x:
        c = x["unshaped_ceiling"]
        table.add_row(
            "unshaped TCP ceiling (this machine)",
            f"{c['cross_host_bps'] / 1e9:.2f} Gbit/s across hosts, "
            f"{c['same_host_bps'] / 1e9:.2f} on 1 host",
            "",
        )
    if "rtt_ms" in x:
        t = x["rtt_ms"]
        table.add_row(
            "round trip the underlay adds",
            f"{t['added_by_underlay']:.3f} ms ({t['cross_host_median']:.3f} across, "
            f"{t['same_host_median']:.3f} on 1 host)",
            "",
        )
    for key in ("change", "convergence", "cross_host_fidelity", "scale", "simulation"):
        if "error" in r.get(key, {}):
            table.add_row(key, f"failed: {r[key]['error']}", "")
    return table
