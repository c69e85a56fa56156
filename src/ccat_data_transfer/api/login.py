"""Dashboard access (API layer): public, a viewer token, or the login cookie.

When DASHBOARD_PUBLIC is false the dashboard and ``/metrics`` need a ``viewer`` (or
``admin``) token.  Programs send it as ``Authorization: Bearer``; a browser trades it
once at ``/dashboard/login`` for a cookie: HttpOnly, SameSite=Strict, signed with
HMAC-SHA256 under DASHBOARD_COOKIE_SECRET, holding the token's id and an expiry -- never
the token.  Each request re-checks that token, so revoking it ends the browser session
too.  A browser asking for a page without a valid cookie is redirected to the login page;
JSON requests get 401 (403 for a token without the role).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from ccat_data_transfer.api.auth import Principal, principal_of, token_row
from ccat_data_transfer.api.deps import get_session
from ccat_data_transfer.api.rendering import templates
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import CcatError
from ccat_data_transfer.core.logs import get_logger
from ccat_ops_db import models as m

log = get_logger(__name__)

COOKIE = "ccat_dashboard"
LOGIN_PATH = "/dashboard/login"
_MAX_TOKEN_CHARS = 256
_PROCESS_SECRET = secrets.token_bytes(32)


class LoginRequired(CcatError):
    """A browser asked for a dashboard page without a valid login: send it to log in."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def dashboard_is_public() -> bool:
    value = settings.get("DASHBOARD_PUBLIC", True)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _secret() -> bytes:
    configured = str(settings.get("DASHBOARD_COOKIE_SECRET", "") or "")
    # Without a configured secret, logins last as long as this process (one worker).
    return configured.encode() if configured else _PROCESS_SECRET


def _sign(payload: str) -> str:
    return hmac.new(_secret(), payload.encode(), hashlib.sha256).hexdigest()


def make_cookie_value(token_id: int, lifetime_s: int) -> str:
    payload = f"{token_id}.{int(time.time()) + lifetime_s}"
    return f"{payload}.{_sign(payload)}"


def cookie_token_id(value: str | None) -> int | None:
    """The token id a cookie value stands for, or None if it is forged or expired."""
    if not value or value.count(".") != 2:
        return None
    token_id, expires, signature = value.split(".")
    if not hmac.compare_digest(signature, _sign(f"{token_id}.{expires}")):
        return None
    if not (token_id.isascii() and token_id.isdigit() and expires.isascii() and expires.isdigit()):
        return None
    if int(expires) < time.time():
        return None
    return int(token_id)


def _is_browser_page(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return (
        request.method == "GET"
        and "text/html" in accept
        and not request.url.path.startswith("/dashboard/api/")
    )


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _caller(request: Request, session: Session) -> Principal | None:
    """The viewer behind a bearer token or a login cookie (None: neither was sent)."""
    token = _bearer(request)
    if token is not None:
        return principal_of(session, token_row(session, token))
    token_id = cookie_token_id(request.cookies.get(COOKIE))
    if token_id is None:
        return None
    try:
        return principal_of(session, session.get(m.ApiToken, token_id))
    except HTTPException:
        return None  # revoked or expired since the login: log in again


def _require_viewer(request: Request, session: Session, redirect: bool) -> None:
    if dashboard_is_public():
        return
    principal = _caller(request, session)
    if principal is None:
        if redirect and _is_browser_page(request):
            raise LoginRequired(request.url.path)
        raise HTTPException(
            status_code=401,
            detail="a viewer token (Authorization: Bearer) or a dashboard login is needed",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not principal.has("viewer"):
        raise HTTPException(status_code=403, detail="role viewer required")


def dashboard_viewer(request: Request, session: Session = Depends(get_session)) -> None:
    """Dashboard pages and their JSON: public, or a viewer by token or cookie; a browser
    without a login is redirected to the login page."""
    _require_viewer(request, session, redirect=True)


def metrics_viewer(request: Request, session: Session = Depends(get_session)) -> None:
    """``/metrics``: public with the dashboard, else a viewer by token or cookie (401)."""
    _require_viewer(request, session, redirect=False)


def login_redirect(exc: LoginRequired) -> RedirectResponse:
    return RedirectResponse(f"{LOGIN_PATH}?next={quote(exc.next_path)}", status_code=303)


# ---------------------------------------------------------------------------------------
# Login and logout
# ---------------------------------------------------------------------------------------

router = APIRouter(prefix="/dashboard", include_in_schema=False)


def _render_login(request: Request, next_path: str, error: str = "", code: int = 200) -> Any:
    context = {"next": next_path, "error": error, "public": dashboard_is_public()}
    return templates.TemplateResponse(request, "login.html", context, status_code=code)


def _safe_next(value: str | None) -> str:
    """Only a path of the dashboard itself (no open redirect to another site)."""
    if value and value.startswith("/dashboard") and "//" not in value and "\\" not in value:
        return value
    return "/dashboard/"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> Any:
    return _render_login(request, _safe_next(next))


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()  # bounded by API_MAX_BODY_BYTES
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    return {k: v[0] for k, v in fields.items() if v}


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    form: dict[str, str] = Depends(_form),
    session: Session = Depends(get_session),
) -> Any:
    """Trade a viewer token for the signed login cookie."""
    next_path = _safe_next(form.get("next"))
    token = form.get("token", "").strip()
    if not token or len(token) > _MAX_TOKEN_CHARS:
        return _render_login(request, next_path, "Enter a viewer token.", 401)
    try:
        principal = principal_of(session, token_row(session, token))
    except HTTPException:
        return _render_login(request, next_path, "Unknown, revoked or expired token.", 401)
    if not principal.has("viewer"):
        return _render_login(request, next_path, "This token has no viewer role.", 403)
    hours = float(settings.get("DASHBOARD_LOGIN_HOURS", 12))
    lifetime = max(60, int(hours * 3600))
    response = RedirectResponse(next_path, status_code=303)
    response.set_cookie(
        COOKIE,
        make_cookie_value(principal.token_id, lifetime),
        max_age=lifetime,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    log.info("dashboard_login", user=principal.username, token_id=principal.token_id)
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
