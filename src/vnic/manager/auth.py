"""API tokens, roles and what each role may do.

Three roles:

- ``admin`` manages profiles, sessions and tokens, and may do anything else;
- ``owner`` adds, launches, overrides, destroys and removes VMs, only in the
  sessions whose ``owner`` is this token's name, and only as far as the
  session policy allows (the service enforces the policy for everyone);
- ``reader`` reads: profiles, sessions, VMs, drivers and metrics.

Every role may read. A token is ``vnic_`` followed by 256 random bits; only
its SHA-256 is stored, so a stolen database does not hand out tokens. With
that much entropy a plain hash is enough: nothing can be guessed to brute
force. The first admin token comes from ``vnic token create NAME --role
admin`` on the manager's host; nothing ships with a default.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from vnic.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from vnic.model.profile import parse_name
from vnic.store.db import Database
from vnic.store.models import SessionRow, TokenRow

ROLES = ("admin", "owner", "reader")
TOKEN_PREFIX = "vnic_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name and role."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class TokenInfo:
    name: str
    role: str
    created_at: datetime


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_role(value: object, path: str = "role") -> str:
    if value not in ROLES:
        raise InvalidInput.one(path, value, "one of " + ", ".join(ROLES))
    return str(value)


def _now() -> datetime:
    return datetime.now(UTC)


#: Seconds a successful authentication is remembered. A token revoked through this
#: process stops working at once; through another process, within this time.
AUTH_CACHE_SECONDS = 5.0


class Tokens:
    """Token records in the central database."""

    def __init__(self, db: Database, clock: Callable[[], datetime] = _now) -> None:
        self.db = db
        self.clock = clock
        # digest -> (principal, monotonic time it expires): every API call
        # authenticates, and a database round trip per call is most of a read's cost.
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._cache_lock = threading.Lock()

    def create(self, name: str, role: str) -> tuple[TokenInfo, str]:
        """A new token; returns its record and the secret, which is never shown again."""
        name = parse_name(name, "name")
        role = parse_role(role)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.transaction() as s:
            if s.scalar(select(TokenRow).where(TokenRow.name == name)) is not None:
                raise Conflict(f"a token named {name!r} already exists")
            row = TokenRow(
                name=name, role=role, secret_hash=hash_secret(secret), created_at=self.clock()
            )
            s.add(row)
            s.flush()
            return TokenInfo(row.name, row.role, row.created_at), secret

    def list(self) -> list[TokenInfo]:
        with self.db.reading() as s:
            rows = s.scalars(select(TokenRow).order_by(TokenRow.name))
            return [TokenInfo(r.name, r.role, r.created_at) for r in rows]

    def revoke(self, name: str) -> None:
        with self.db.transaction() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.name == name))
            if row is None:
                raise NotFound("token", name, s.scalars(select(TokenRow.name)).all())
            s.delete(row)
        with self._cache_lock:
            self._cache.clear()

    def authenticate(self, secret: str | None) -> Principal:
        """The principal of ``secret``; refused (401) when missing or unknown."""
        if not secret:
            raise Unauthenticated("this endpoint needs a token: 'Authorization: Bearer vnic_...'")
        digest = hash_secret(secret)
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        with self.db.reading() as s:
            row = s.scalar(select(TokenRow).where(TokenRow.secret_hash == digest))
            # The lookup is by hash; compare again in constant time for good measure.
            if row is None or not hmac.compare_digest(row.secret_hash, digest):
                raise Unauthenticated("the token is not known (revoked, or mistyped)")
            who = Principal(row.name, row.role)
        with self._cache_lock:
            self._cache[digest] = (who, now + AUTH_CACHE_SECONDS)
        return who

    def session_owner(self, session: str) -> str | None:
        with self.db.reading() as s:
            row = s.scalar(select(SessionRow).where(SessionRow.name == session))
            if row is None:
                raise NotFound("session", session, s.scalars(select(SessionRow.name)).all())
            return row.owner


def require_admin(who: Principal, action: str) -> None:
    if not who.is_admin:
        raise Forbidden(f"{action} needs the admin role; token {who.name!r} has role {who.role!r}")


def require_vm_writer(who: Principal, session: str, owner: str | None, action: str) -> None:
    """Admins may change any session's VMs; owners only their own sessions'."""
    if who.is_admin:
        return
    if who.role == "owner" and owner == who.name:
        return
    if who.role == "owner":
        raise Forbidden(
            f"{action} in session {session!r} needs its owner or an admin; "
            f"token {who.name!r} does not own it"
        )
    raise Forbidden(
        f"{action} needs the owner or admin role; token {who.name!r} has role {who.role!r}"
    )
