"""Package endpoints (API layer): the state of a RawDataPackage and everything attached."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path
from sqlalchemy.orm import Session

from ccat_data_transfer.api.auth import Principal, require_role
from ccat_data_transfer.api.deps import MAX_ID, get_session
from ccat_data_transfer.core.errors import NotFoundError
from ccat_data_transfer.packaging.raw_report import describe_raw_data_package

router = APIRouter(prefix="/api/v1", tags=["packages"])


@router.get("/packages/{ident}", responses={401: {}, 403: {}, 404: {}})
def get_package(
    ident: str = Path(min_length=1, max_length=512, description="id or file name"),
    session: Session = Depends(get_session),
    _principal: Principal = Depends(require_role("viewer", "instrument", "scientist")),
) -> dict[str, Any]:
    """A RawDataPackage by id or file name: files, copies, transfer package, transfers."""
    text = ident.strip()
    if text.isdigit() and not (text.isascii() and int(text) <= MAX_ID):
        # No id is that large (nor a non-ASCII numeral): nothing to look up.
        raise NotFoundError(f"no raw data package with id or file name {text!r}")
    return describe_raw_data_package(session, text)
