"""A VM's effective profile as a table: every field, its value and the layer it came
from. ``vnic vm explain`` prints it, and so does the demo (:mod:`vnic.lab.demo`); it
lives in the lab because the lab may not import the CLI."""

from __future__ import annotations

from rich.table import Table

from vnic.manager.results import Explanation


def explanation_table(e: Explanation, *, all_fields: bool = False) -> Table:
    """The table of ``e``: fields nobody set are left out unless ``all_fields``."""
    revs = (
        ", ".join(f"{n} r{r}" for n, r in sorted(e.effective.revisions.items())) or "built-in only"
    )
    title = f"{e.vm.session}/{e.vm.name}  mac {e.vm.mac}  role {e.vm.role or '-'}  profiles: {revs}"
    table = Table("field", "value", "source", title=title, title_justify="left")
    for path, value, source in e.effective.rows():
        if value == "-" and not all_fields and source.layer == "unset":
            continue
        table.add_row(path, value, str(source))
    return table
