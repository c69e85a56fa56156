"""Staging-job endpoints (API layer): scientists ask for archived data at a PROCESSING location,
follow their jobs, and say when they are done.

All endpoints need the ``scientist`` role (``admin`` always passes).  A job records who
created it; only that user (or an admin) may mark it done.  Errors are 4xx with a reason:
unknown things 404, refused requests 400, someone else's job 403.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from ccat_data_transfer.api.auth import Principal, require_role
from ccat_data_transfer.api.deps import MAX_ID, get_session
from ccat_data_transfer.core.errors import CcatError, NotFoundError
from ccat_data_transfer.staging import jobs, retention

router = APIRouter(prefix="/api/v1/staging-jobs", tags=["staging"])

SessionDep = Annotated[Session, Depends(get_session)]
Scientist = Annotated[Principal, Depends(require_role("scientist"))]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
JobId = Annotated[int, Path(ge=1, le=MAX_ID)]
#: Longest retention a job may ask for: ten years.
MAX_RETENTION_MINUTES = 10 * 366 * 24 * 60


class StagingJobRequest(BaseModel):
    """Name the packages one way: IDs, an executed obs unit (optionally with an
    instrument), or an instrument with a time range (observation time, UTC)."""

    package_ids: list[Id] | None = Field(default=None, max_length=100000)
    executed_obs_unit: Annotated[str, Field(min_length=1, max_length=256)] | Id | None = Field(
        default=None, description="name or ID"
    )
    instrument: str | None = Field(default=None, min_length=1, max_length=128)
    start: datetime | None = Field(default=None, description="ISO 8601; naive means UTC")
    end: datetime | None = Field(default=None, description="ISO 8601; exclusive")
    destination: str = Field(default="processing_scratch", min_length=1, max_length=128)
    retention_minutes: int | None = Field(default=None, gt=0, le=MAX_RETENTION_MINUTES)
    name: str | None = Field(default=None, max_length=256)


@contextmanager
def _http_errors() -> Iterator[None]:
    """Our errors as a 4xx with the reason: unknown things 404, refused requests 400."""
    try:
        yield
    except CcatError as exc:
        code = status.HTTP_404_NOT_FOUND if isinstance(exc, NotFoundError) else 400
        raise HTTPException(status_code=code, detail=str(exc)) from None


@router.post(
    "", status_code=status.HTTP_201_CREATED, responses={400: {}, 401: {}, 403: {}, 404: {}}
)
def create_job(
    request: StagingJobRequest, session: SessionDep, principal: Scientist
) -> dict[str, Any]:
    """Create a staging job; the staging manager picks it up on its next cycle."""
    with _http_errors():
        # The request's fields are create_staging_job's keyword arguments, one for one.
        job = jobs.create_staging_job(session, **request.model_dump(), user=principal.user_id)
    return jobs.job_as_dict(job)


@router.get("", responses={401: {}, 403: {}})
def list_jobs(
    session: SessionDep,
    principal: Scientist,
    active: bool | None = Query(default=None, description="only (in)active jobs"),
    mine: bool = Query(default=False, description="only my jobs"),
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    """Staging jobs, newest first, with their progress."""
    found = jobs.list_staging_jobs(
        session, active=active, user=principal.username if mine else None, limit=limit
    )
    return [jobs.job_as_dict(j) for j in found]


@router.get("/{job_id}", responses={401: {}, 403: {}, 404: {}})
def get_job(job_id: JobId, session: SessionDep, _principal: Scientist) -> dict[str, Any]:
    """One staging job: status, progress, packages, expiry."""
    with _http_errors():
        return jobs.job_as_dict(jobs.get_staging_job(session, job_id))


@router.post("/{job_id}/done", responses={401: {}, 403: {}, 404: {}})
def job_done(job_id: JobId, session: SessionDep, principal: Scientist) -> dict[str, Any]:
    """Mark the job done (inactive): its files are cleaned up once no other active job
    at that location needs them.  Idempotent."""
    with _http_errors():
        job = jobs.get_staging_job(session, job_id)
        if (
            job.user_id is not None
            and job.user_id != principal.user_id
            and not principal.has("admin")
        ):
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=f"staging job {job_id} belongs to another user",
            )
        job = retention.deactivate_staging_job(session, job_id)
    return jobs.job_as_dict(job)
