"""Size limits of user input, per field and per object, in one place.

Every limit is far above what a real profile, session or VM needs and low enough
that one request cannot make the manager hold, store or echo megabytes (issue #15:
20 000 labels, a 1 MB reason were accepted). Counts are numbers of items; lengths
are characters. A limit is refused with an error naming the field, never clamped.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, Final

from vnic.errors import FieldError, InvalidInput

#: Labels on one profile, VM or assignment rule (each key <= 63, value <= 200 characters).
LABELS_MAX: Final = 64
#: Declared needs of one VM or assignment rule (each a word of <= 64 characters).
NEEDS_MAX: Final = 64
#: Assignment rules of one session.
ASSIGNMENT_RULES_MAX: Final = 256
#: Threshold rules of one session's controller.
CONTROLLER_RULES_MAX: Final = 256
#: QoS classes of one direction (HTB takes more, nobody needs more).
QOS_CLASSES_MAX: Final = 64
#: Items in one key of a QoS class's match (dscp, protocol, ports, networks): each
#: becomes kernel filters, so the count is a dataplane cost, not just storage.
MATCH_ITEMS_MAX: Final = 64
#: An adjustment's or audit entry's reason.
REASON_MAX: Final = 500
#: Nesting depth of a JSON or YAML document (a profile is 4 deep).
DEPTH_MAX: Final = 32
#: Largest integer the database stores (SQLite and PostgreSQL BIGINT: signed 64-bit).
DB_INT_MAX: Final = 2**63 - 1


def check_count(items: Sized, path: str, limit: int, what: str) -> None:
    """Refuse more than ``limit`` items (``what``: "labels", "rules" ...)."""
    if len(items) > limit:
        raise InvalidInput([FieldError(path, f"{len(items)} {what}", f"at most {limit} {what}")])


def check_text(value: Any, path: str, limit: int, what: str = "text") -> str:
    """``value`` if it is text of at most ``limit`` characters."""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput.one(path, value, f"{what} of at most {limit} characters")
    return value
