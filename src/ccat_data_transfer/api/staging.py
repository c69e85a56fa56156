"""Staging-job endpoints: scientists ask for archived data at a PROCESSING location,
follow their jobs, and say when they are done.

All endpoints need the ``scientist`` role (``admin`` always passes).  A job records who
created it; only that user (or an admin) may mark it done.  Errors are 4xx with a reason:
unknown things 404, refused requests 400, someone else's job 403.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from ccat_data_transfer import staging_manager
from ccat_data_transfer.api.auth import Principal, require_role
from ccat_data_transfer.api.deps import get_session
from ccat_data_transfer.exceptions import CcatError, NotFoundError

router = APIRouter(prefix="/api/v1/staging-jobs", tags=["staging"])

_scientist = require_role("scientist")


class StagingJobRequest(BaseModel):
    """Name the packages one way: IDs, an executed obs unit (optionally with an
    instrument), or an instrument with a time range (observation time, UTC)."""

    package_ids: list[int] | None = Field(default=None, max_length=100000)
    executed_obs_unit: str | int | None = Field(default=None, description="name or ID")
    instrument: str | None = None
    start: datetime | None = Field(default=None, description="ISO 8601; naive means UTC")
    end: datetime | None = Field(default=None, description="ISO 8601; exclusive")
    destination: str = "processing_scratch"
    retention_minutes: int | None = Field(default=None, gt=0)
    name: str | None = Field(default=None, max_length=256)


def _http(exc: CcatError) -> HTTPException:
    code = status.HTTP_404_NOT_FOUND if isinstance(exc, NotFoundError) else 400
    return HTTPException(status_code=code, detail=str(exc))


@router.post(
    "", status_code=status.HTTP_201_CREATED, responses={400: {}, 401: {}, 403: {}, 404: {}}
)
def create_job(
    request: StagingJobRequest,
    session: Session = Depends(get_session),
    principal: Principal = Depends(_scientist),
) -> dict[str, Any]:
    """Create a staging job; the staging manager picks it up on its next cycle."""
    try:
        job = staging_manager.create_staging_job(
            session,
            package_ids=request.package_ids,
            executed_obs_unit=request.executed_obs_unit,
            instrument=request.instrument,
            start=request.start,
            end=request.end,
            destination=request.destination,
            retention_minutes=request.retention_minutes,
            name=request.name,
            user=principal.user_id,
        )
    except CcatError as exc:
        raise _http(exc) from None
    return staging_manager.job_as_dict(job)


@router.get("", responses={401: {}, 403: {}})
def list_jobs(
    active: bool | None = Query(default=None, description="only (in)active jobs"),
    mine: bool = Query(default=False, description="only my jobs"),
    limit: int = Query(default=100, ge=1, le=1000),
    session: Session = Depends(get_session),
    principal: Principal = Depends(_scientist),
) -> list[dict[str, Any]]:
    """Staging jobs, newest first, with their progress."""
    jobs = staging_manager.list_staging_jobs(
        session, active=active, user=principal.username if mine else None, limit=limit
    )
    return [staging_manager.job_as_dict(j) for j in jobs]


@router.get("/{job_id}", responses={401: {}, 403: {}, 404: {}})
def get_job(
    job_id: int,
    session: Session = Depends(get_session),
    _principal: Principal = Depends(_scientist),
) -> dict[str, Any]:
    """One staging job: status, progress, packages, expiry."""
    try:
        return staging_manager.job_as_dict(staging_manager.get_staging_job(session, job_id))
    except CcatError as exc:
        raise _http(exc) from None


@router.post("/{job_id}/done", responses={401: {}, 403: {}, 404: {}})
def job_done(
    job_id: int,
    session: Session = Depends(get_session),
    principal: Principal = Depends(_scientist),
) -> dict[str, Any]:
    """Mark the job done (inactive): its files are cleaned up once no other active job
    at that location needs them.  Idempotent."""
    try:
        job = staging_manager.get_staging_job(session, job_id)
        if (
            job.user_id is not None
            and job.user_id != principal.user_id
            and not principal.has("admin")
        ):
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=f"staging job {job_id} belongs to another user",
            )
        job = staging_manager.deactivate_staging_job(session, job_id)
    except CcatError as exc:
        raise _http(exc) from None
    return staging_manager.job_as_dict(job)
