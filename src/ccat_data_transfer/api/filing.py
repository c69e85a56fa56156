"""Filing endpoints: instruments register raw files and finish executed obs units."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from ccat_data_transfer.api.auth import Principal, require_filer
from ccat_data_transfer.api.deps import get_session
from ccat_data_transfer.filing.register import (
    FilingEntry,
    FilingResult,
    file_raw_data_files,
    finish_executed_obs_unit,
)

router = APIRouter(prefix="/api/v1", tags=["filing"])


class FilingRequest(BaseModel):
    """A batch of files lying at one SOURCE location; all are filed or none."""

    model_config = ConfigDict(extra="forbid")

    location: str = Field(min_length=1, max_length=128)
    files: list[FilingEntry] = Field(min_length=1)


class FinishResponse(BaseModel):
    name: str
    finished_at: str
    status: str


@router.post(
    "/files",
    response_model=FilingResult,
    status_code=201,
    responses={400: {}, 401: {}, 403: {}, 409: {}, 422: {}},
)
def post_files(
    body: FilingRequest,
    session: Session = Depends(get_session),
    principal: Principal = Depends(require_filer),
) -> Any:
    """File raw data files in bulk (idempotent for files already filed identically).
    A token scoped to an instrument files only into that instrument's SOURCE locations."""
    result = file_raw_data_files(session, body.location, body.files, principal.instrument)
    session.commit()  # commit before answering: a 201 means the files are filed
    return result


@router.post(
    "/executed-obs-units/{name}/finish",
    response_model=FinishResponse,
    responses={401: {}, 403: {}, 404: {}},
)
def post_finish(
    name: str = Path(min_length=1, max_length=256),
    session: Session = Depends(get_session),
    principal: Principal = Depends(require_filer),
) -> Any:
    """Mark an executed obs unit finished: its files are packaged without waiting.
    A token scoped to an instrument finishes only units holding that instrument's files."""
    eou = finish_executed_obs_unit(session, name, principal.instrument)
    session.commit()
    return FinishResponse(
        name=eou.name, finished_at=eou.finished_at.isoformat(), status=eou.status.name
    )
