"""`vnic bench ui` runs: a real `vnic serve`, Chromium under the UI's CSP, every VM shown.

Only that it measures (its numbers are the benchmark's business, not a test's)."""

from __future__ import annotations

from vnic.lab.bench.ui import run


def test_bench_ui_renders_every_vm_and_reports_each_render() -> None:
    result = run(vms=3, runs=2)  # raises if the page shows another number of VMs
    assert result["vms"] == 3
    assert len(result["render_ms"]) == 2 and len(result["one_vm_render_ms"]) == 2
    assert all(ms >= 0 for ms in result["render_ms"] + result["one_vm_render_ms"])
    assert isinstance(result["pass"], bool)
