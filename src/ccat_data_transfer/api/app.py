"""The FastAPI application: routers per area, errors as 4xx with a reason.

``create_app()`` is what ``uvicorn`` serves (``uvicorn --factory
ccat_data_transfer.api.app:create_app``).  Bad input never produces a 5xx: validation
errors are 422, refusals 400/409, unknown things 404, each with a ``detail`` reason; any
other error of the project's family (:class:`~ccat_ops_db.errors.CcatError`)
503/507/500 with its message (:func:`status_for`);
request bodies over API_MAX_BODY_BYTES are refused (413) before they are parsed.
A database that cannot be reached, or a connection lost during the request (PostgreSQL
restarting), is 503 with ``Retry-After`` and a reason: the request's transaction was
rolled back (nothing of it happened), and every write endpoint is safe to repeat.

Room in the house: API layer (the HTTP face of filing, packages, staging, dashboard).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ccat_data_transfer import __version__
from ccat_data_transfer.api.limits import BodyLimitMiddleware
from ccat_data_transfer.api.login import LoginRequired, login_redirect
from ccat_data_transfer.api.openapi import describe_api
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import (
    CcatError,
    DatabaseUnavailableError,
    NotFoundError,
    RetryableError,
    ValidationError,
)
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage.errors import StorageFullError, StorageUnavailableError
from ccat_data_transfer.filing.register import FilingError

#: Router modules of ``ccat_data_transfer.api``, one per area; each has a module-level
#: ``router``.  An area not written yet is skipped (like the CLI's command modules).
ROUTER_MODULES = ["filing", "packages", "staging", "dashboard", "login", "metrics_routes"]

#: Seconds a client is asked to wait before repeating a request that met a lost or
#: unreachable database (a PostgreSQL restart takes a few seconds).
DB_RETRY_AFTER_SECONDS = 5

#: What a lost or unreachable database raises: the connection refused, dropped or
#: invalidated (psycopg and sqlite3 report these as OperationalError/InterfaceError).
_DATABASE_LOST = (OperationalError, InterfaceError, DisconnectionError, DatabaseUnavailableError)

log = get_logger(__name__)


def _routers() -> list[Any]:
    routers = []
    for name in ROUTER_MODULES:
        module_name = f"ccat_data_transfer.api.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # an area not built yet; anything else is a bug
            if exc.name != module_name:
                raise
            continue
        routers.append(module.router)
    return routers


def _safe(value: Any) -> Any:
    """JSON-safe copy of an error payload: hostile input (lone surrogates, NaN, infinity)
    echoed in a reason must not turn a 4xx into a 500 while the response is rendered."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")[:2000]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, dict):
        return {str(_safe(str(k))): _safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe(v) for v in value]
    return _safe(str(value))


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def _error(status_code: int, detail: Any) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": _safe(detail)})


def status_for(exc: CcatError) -> int:
    """The status code of an error of the project's family that no narrower handler
    answers: 503 when trying again later may help (storage or database unreachable, a
    retryable failure), 507 when a storage is full, else 500; the reason is its message."""
    if isinstance(exc, StorageFullError):
        return 507
    if isinstance(exc, StorageUnavailableError | DatabaseUnavailableError | RetryableError):
        return 503
    return 500


async def _database_lost(request: Request, exc: Exception) -> JSONResponse:
    # The session was rolled back (or its connection died with the transaction):
    # nothing of the request happened, so the client may simply repeat it.
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    log.warning(
        "api_database_unavailable",
        method=request.method,
        path=request.url.path,
        error=f"{type(exc).__name__}: {reason[0] if reason else ''}",
    )
    return JSONResponse(
        {
            "detail": "the database is unavailable (restarting or unreachable); nothing "
            "of this request was done: retry after "
            f"{DB_RETRY_AFTER_SECONDS} seconds"
        },
        503,
        headers={"Retry-After": str(DB_RETRY_AFTER_SECONDS)},
    )


def create_app(database_url: str | None = None) -> FastAPI:
    """Build the API.  ``database_url`` overrides the DATABASE_URL setting."""
    from ccat_data_transfer.core.celery_app import import_task_modules

    import_task_modules()  # the API sends tasks (staging, retries): it knows them all
    app = FastAPI(
        title="CCAT Data Transfer System API",
        version=__version__,
        description="File raw data, follow packages through the pipeline.",
    )
    app.state.db = DatabaseConnection(database_url) if database_url else None
    for router in _routers():
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware)
    app.openapi = lambda: describe_api(app)  # type: ignore[method-assign]

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route's methods; list every route's.
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return JSONResponse({"detail": _safe(exc.detail)}, exc.status_code, headers=headers)

    @app.exception_handler(LoginRequired)
    async def _login(_request: Request, exc: LoginRequired) -> Any:
        return login_redirect(exc)

    @app.exception_handler(RequestValidationError)
    async def _malformed(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the input, which may not be renderable as JSON.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return _error(422, errors)

    @app.exception_handler(FilingError)
    async def _filing_error(_request: Request, exc: FilingError) -> JSONResponse:
        return _error(exc.status_code, exc.as_dict())

    @app.exception_handler(NotFoundError)
    async def _not_found(_request: Request, exc: NotFoundError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(ValidationError)
    async def _invalid(_request: Request, exc: ValidationError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(CcatError)
    async def _operator_error(_request: Request, exc: CcatError) -> JSONResponse:
        # Every other member of the family (storage, topology, configuration, ...): a
        # status code and the message as the reason, never a bare 500 without one.
        return _error(status_for(exc), f"{type(exc).__name__}: {exc}")

    @app.exception_handler(IntegrityError)
    async def _conflict(_request: Request, exc: IntegrityError) -> JSONResponse:
        reason = str(exc.orig).splitlines()[0] if exc.orig else "conflict"
        return _error(409, f"conflict: {reason}")

    for lost in _DATABASE_LOST:
        app.add_exception_handler(lost, _database_lost)

    @app.get("/api/v1/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app
