"""Token authentication with roles (API layer).

Clients send ``Authorization: Bearer <token>``.  Only the SHA-256 of a token is stored
(``ApiToken.token_hash``); ``create_api_token`` returns the token once.  Each token
carries its own role -- ``admin`` (may do everything), ``instrument`` (file data),
``scientist`` (stage data), ``viewer`` (read) -- and an ``instrument`` token is always
scoped to one instrument (it files only into that instrument's SOURCE locations and
finishes only that instrument's executed obs units).  A user's other tokens grant
nothing.  ``require_role("instrument")`` answers 401 without a
valid token and 403 when the token lacks the role.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.api.deps import get_session
from ccat_data_transfer.core.errors import NotFoundError, ValidationError
from ccat_ops_db import models as m

ROLES: dict[str, str] = {
    "admin": "Everything, including user and token administration",
    "instrument": "File raw data and finish executed obs units",
    "scientist": "Request staging of data for processing",
    "viewer": "Read package, transfer and buffer state",
}

_bearer = HTTPBearer(auto_error=False)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_api_token(
    session: Session,
    username: str,
    role: str,
    name: str | None = None,
    expires_in_days: int | None = None,
    instrument: str | None = None,
) -> str:
    """Create (or reuse) the user and return a new token with ``role`` (shown once).

    ``instrument`` scopes an ``instrument`` token to that instrument's SOURCE locations;
    an ``instrument`` token without it is refused (it would file anywhere).
    """
    if role not in ROLES:
        raise ValidationError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    if not username or len(username) > 128:
        raise ValidationError("user name must be 1 to 128 characters")
    scope = None
    if role == "instrument" and instrument is None:
        raise ValidationError(
            "an instrument token needs --instrument NAME (the instrument it files for)"
        )
    if instrument is not None:
        if role != "instrument":
            raise ValidationError("only an instrument token takes --instrument")
        scope = session.scalars(
            select(m.Instrument).where(m.Instrument.name == instrument)
        ).one_or_none()
        if scope is None:
            raise ValidationError(f"no instrument named {instrument!r}")
    role_row = session.scalars(select(m.Role).where(m.Role.name == role)).one_or_none()
    if role_row is None:
        role_row = m.Role(name=role, description=ROLES[role])
        session.add(role_row)
    user = session.scalars(select(m.User).where(m.User.username == username)).one_or_none()
    if user is None:
        user = m.User(username=username, active=True)
        session.add(user)
    token = "ccat_" + secrets.token_urlsafe(32)
    session.add(
        m.ApiToken(
            user=user,
            role=role_row,
            instrument=scope,
            name=name or f"{username}-{role}",
            token_hash=hash_token(token),
            expires_at=(m.utcnow() + timedelta(days=expires_in_days)) if expires_in_days else None,
        )
    )
    session.flush()
    return token


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    user_id: int
    username: str
    roles: frozenset[str]
    token_id: int = 0
    #: The instrument an ``instrument`` token is scoped to (None for the other roles; an
    #: unscoped ``instrument`` token, made before scopes were required, may not file).
    instrument: str | None = None

    def has(self, *roles: str) -> bool:
        return "admin" in self.roles or any(r in self.roles for r in roles)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


#: ``last_used_at`` is written at most this often per token (not at every request).
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def principal_of(session: Session, row: m.ApiToken | None) -> Principal:
    """The caller a token row stands for; 401 if it is unknown, revoked, expired or its
    user is disabled.  Records when the token was last used."""
    now = m.utcnow()
    if row is None or row.revoked or (row.expires_at is not None and row.expires_at < now):
        raise _unauthorized("invalid, revoked or expired token")
    if not row.user.active:
        raise _unauthorized("user is disabled")
    principal = Principal(
        row.user.id,
        row.user.username,
        frozenset({row.role.name}),
        token_id=row.id,
        instrument=row.instrument.name if row.instrument is not None else None,
    )
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
        # Committed now (nothing else is written yet): it stays even if the request fails.
        row.last_used_at = now
        session.commit()
    return principal


def token_row(session: Session, token: str) -> m.ApiToken | None:
    return session.scalars(
        select(m.ApiToken).where(m.ApiToken.token_hash == hash_token(token))
    ).one_or_none()


def current_principal(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    session: Session = Depends(get_session),
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("missing bearer token")
    return principal_of(session, token_row(session, credentials.credentials))


def require_role(*roles: str) -> Callable[..., Principal]:
    """Dependency: the caller must hold one of ``roles`` (``admin`` always passes)."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown roles {unknown}")

    def check(principal: Principal = Depends(current_principal)) -> Principal:
        if not principal.has(*roles):
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=f"role {' or '.join(roles)} required",
            )
        return principal

    return check


def require_filer(principal: Principal = Depends(require_role("instrument"))) -> Principal:
    """Dependency for filing and finishing: an ``admin``, or an ``instrument`` token with
    its scope.  An unscoped ``instrument`` token (made before scopes were required) would
    file into any instrument's locations, so it is refused with what to do instead."""
    if "admin" not in principal.roles and principal.instrument is None:
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=(
                "this instrument token has no instrument scope; create a scoped one "
                "(token create --role instrument --instrument NAME) and revoke this one"
            ),
        )
    return principal


def list_api_tokens(session: Session) -> list[dict[str, Any]]:
    """Every token (never its secret): id, user, role, scope, created, last used, revoked."""
    rows = session.scalars(select(m.ApiToken).order_by(m.ApiToken.id))
    return [
        {
            "id": t.id,
            "user": t.user.username,
            "name": t.name,
            "role": t.role.name,
            "scope": t.instrument.name if t.instrument is not None else None,
            "created_at": t.created_at.isoformat(),
            "expires_at": t.expires_at.isoformat() if t.expires_at else None,
            "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
            "revoked": t.revoked,
        }
        for t in rows
    ]


def revoke_api_token(session: Session, token_id: int) -> bool:
    """Revoke token ``token_id``; False if it was revoked already.  NotFoundError if none."""
    row = session.get(m.ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no API token with id {token_id}")
    if row.revoked:
        return False
    row.revoked = True
    session.flush()
    return True
