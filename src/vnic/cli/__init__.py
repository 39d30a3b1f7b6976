"""Command line: `vnic` and its command groups."""
