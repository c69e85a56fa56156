"""The web dashboard (the user's document's "ops-db-ui"), served by the API process.

Server-rendered pages for operators: sites and buffer gauges, package states and a
searchable package list, each package's copies and transfers, the deletion audit trail,
staging jobs, and two plots (buffer use over time, throughput per day).  Every page has a
JSON twin under ``/dashboard/api/...``; the page takes its data from the twin (as a
FastAPI dependency), so both read the same query parameters and show the same numbers.

This module holds the routes (access: :mod:`ccat_data_transfer.api.login`) and the rendering;
what the pages show is computed in :mod:`ccat_data_transfer.api.dashboard_queries`.

Room in the house: API layer.  May import the API's auth/deps, core (config,
formatting) and ccat_ops_db; nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as FastPath
from fastapi.responses import FileResponse, HTMLResponse
from sqlalchemy.orm import Session

from ccat_data_transfer.api.dashboard_queries import (
    deletions_data,
    overview_data,
    package_detail,
    package_list,
    staging_data,
)
from ccat_data_transfer.api.dashboard_trends import buffer_usage_data, throughput_data
from ccat_data_transfer.api.deps import MAX_ID, get_session
from ccat_data_transfer.api.login import dashboard_is_public, dashboard_viewer
from ccat_data_transfer.api.rendering import templates
from ccat_ops_db import models as m

_HERE = Path(__file__).resolve().parent
STATIC_DIR = _HERE / "static"

# Bounds of the query parameters (the queries bound their own row counts).
MAX_PER_PAGE = 500
MAX_WINDOW_HOURS = 24 * 366
MAX_PAGE = 1_000_000


# ---------------------------------------------------------------------------------------
# Access
# ---------------------------------------------------------------------------------------


# Public, or a viewer by token or login cookie: see ccat_data_transfer.api.login.


router = APIRouter(
    prefix="/dashboard", tags=["dashboard"], dependencies=[Depends(dashboard_viewer)]
)


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


def _render(request: Request, name: str, context: dict[str, Any]) -> HTMLResponse:
    context = {"now": m.utcnow(), "public": dashboard_is_public(), **context}
    return templates.TemplateResponse(request, name, context)


# ---------------------------------------------------------------------------------------
# JSON endpoints
# ---------------------------------------------------------------------------------------

PackageId = Annotated[int, FastPath(ge=1, le=MAX_ID)]
#: Error answers to document: an unknown state (400), location or package (404).
BAD_FILTER: dict[int | str, dict[str, Any]] = {400: {}}
UNKNOWN: dict[int | str, dict[str, Any]] = {404: {}}
Hours = Query(24, ge=1, le=MAX_WINDOW_HOURS, description="time window in hours")


@router.get("/api/overview")
def api_overview(session: Session = Depends(get_session)) -> dict[str, Any]:
    return overview_data(session)


@router.get("/api/packages", responses=BAD_FILTER)
def api_packages(
    file_name: str | None = None,
    state: str | None = None,
    obs_unit: str | None = None,
    page: int = Query(1, ge=1, le=MAX_PAGE),
    per_page: int = Query(50, ge=1, le=MAX_PER_PAGE),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    return package_list(session, file_name, state, obs_unit, page, per_page)


@router.get("/api/packages/{package_id}", responses=UNKNOWN)
def api_package(package_id: PackageId, session: Session = Depends(get_session)) -> dict[str, Any]:
    return package_detail(session, package_id)


@router.get("/api/deletions", responses=UNKNOWN)
def api_deletions(
    location: str | None = None, hours: int = Hours, session: Session = Depends(get_session)
) -> dict[str, Any]:
    return deletions_data(session, location or None, hours)


@router.get("/api/staging")
def api_staging(active: bool | None = None, session: Session = Depends(get_session)) -> dict:
    return staging_data(session, active)


@router.get("/api/buffer-usage", responses=UNKNOWN)
def api_buffer_usage(
    hours: int = Query(168, ge=1, le=MAX_WINDOW_HOURS),
    location: str | None = None,
    kind: Literal["all", "buffer", "archive"] = Query(
        "all", description="buffer: BUFFER locations; archive: long-term archives"
    ),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    return buffer_usage_data(session, hours, location or None, kind)


@router.get("/api/throughput")
def api_throughput(
    days: int = Query(14, ge=1, le=366), session: Session = Depends(get_session)
) -> dict[str, Any]:
    return throughput_data(session, days)


# ---------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------


def _page(
    path: str,
    name: str,
    section: str,
    data: Callable[..., dict[str, Any]],
    key: str | None = "data",
    responses: dict[int | str, dict[str, Any]] | None = None,
    **extra: Any,
) -> None:
    """Route ``path`` to the page ``{name}.html`` (route name ``dashboard_{name}``), shown
    under the menu entry ``section``.  ``data`` is a dependency (mostly the page's JSON
    twin, so that both read the same query parameters); its result is ``key`` in the
    template's context, or, with ``key=None``, its keys are."""

    def show(request: Request, found: dict[str, Any] = Depends(data)) -> HTMLResponse:
        context = found if key is None else {key: found}
        return _render(request, f"{name}.html", {"page": section, **context, **extra})

    router.add_api_route(
        path,
        show,
        methods=["GET"],
        response_class=HTMLResponse,
        name=f"dashboard_{name}",
        responses=responses,
    )


def _all_staging_jobs(session: Session = Depends(get_session)) -> dict[str, Any]:
    # The page lists every job; only the JSON twin takes the ``active`` filter.
    return staging_data(session)


def _trends(
    hours: int = Query(168, ge=1, le=MAX_WINDOW_HOURS),
    days: int = Query(14, ge=1, le=366),
    session: Session = Depends(get_session),
) -> dict[str, Any]:
    return {
        "hours": hours,
        "days": days,
        "buffer": buffer_usage_data(session, hours, kind="buffer"),
        "archive": buffer_usage_data(session, hours, kind="archive"),
        "throughput": throughput_data(session, days),
    }


_page("/", "overview", "overview", api_overview)
_page(
    "/packages",
    "packages",
    "packages",
    api_packages,
    responses=BAD_FILTER,
    states=[s.name for s in m.PackageState],
)
_page("/packages/{package_id}", "package", "packages", api_package, key="pkg", responses=UNKNOWN)
_page(
    "/deletions",
    "deletions",
    "deletions",
    api_deletions,
    responses=UNKNOWN,
    windows=[1, 6, 24, 72, 168, 720],
)
_page("/staging", "staging", "staging", _all_staging_jobs)
_page("/trends", "trends", "trends", _trends, key=None)


_STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}


@router.get("/static/{name}", name="dashboard_static", responses=UNKNOWN)
def static_file(name: str) -> FileResponse:
    # A fixed list, not a directory mount: nothing else under the package can be read.
    if name not in _STATIC_FILES:
        raise HTTPException(status_code=404, detail="no such file")
    return FileResponse(
        STATIC_DIR / name,
        media_type=_STATIC_FILES[name],
        headers={"Cache-Control": "max-age=300"},
    )
