"""Token authentication with roles.

Clients send ``Authorization: Bearer <token>``.  Only the SHA-256 of a token is stored
(``ApiToken.token_hash``); ``create_api_token`` returns the token once.  Roles:
``admin`` (may do everything), ``instrument`` (file data), ``scientist`` (stage data),
``viewer`` (read).  ``require_role("instrument")`` answers 401 without a valid token and
403 when the user lacks the role.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.api.deps import get_session
from ccat_data_transfer.exceptions import ValidationError
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
) -> str:
    """Create (or reuse) the user, give it ``role``, and return a new token (shown once)."""
    if role not in ROLES:
        raise ValidationError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    if not username or len(username) > 128:
        raise ValidationError("user name must be 1 to 128 characters")
    role_row = session.scalars(select(m.Role).where(m.Role.name == role)).one_or_none()
    if role_row is None:
        role_row = m.Role(name=role, description=ROLES[role])
        session.add(role_row)
    user = session.scalars(select(m.User).where(m.User.username == username)).one_or_none()
    if user is None:
        user = m.User(username=username, active=True)
        session.add(user)
    if role_row not in user.roles:
        user.roles.append(role_row)
    token = "ccat_" + secrets.token_urlsafe(32)
    session.add(
        m.ApiToken(
            user=user,
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

    def has(self, *roles: str) -> bool:
        return "admin" in self.roles or any(r in self.roles for r in roles)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


def current_principal(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    session: Session = Depends(get_session),
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("missing bearer token")
    row = session.scalars(
        select(m.ApiToken).where(m.ApiToken.token_hash == hash_token(credentials.credentials))
    ).one_or_none()
    now = m.utcnow()
    if row is None or row.revoked or (row.expires_at is not None and row.expires_at < now):
        raise _unauthorized("invalid, revoked or expired token")
    if not row.user.active:
        raise _unauthorized("user is disabled")
    return Principal(row.user.id, row.user.username, frozenset(r.name for r in row.user.roles))


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
