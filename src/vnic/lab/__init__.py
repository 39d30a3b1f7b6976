"""Measurement, statistics, the demo, and every benchmark (vnic bench)."""
