"""``GET /metrics`` (API layer): the Prometheus exposition text, read from the DB at each
scrape.  Public with the dashboard (DASHBOARD_PUBLIC), else a viewer token or the
dashboard's login cookie."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ccat_data_transfer.api.deps import get_db
from ccat_data_transfer.api.login import metrics_viewer
from ccat_data_transfer.operations.metrics import prometheus_text

router = APIRouter(tags=["metrics"], dependencies=[Depends(metrics_viewer)])


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    # A plain (sync) handler: the scrape's blocking DB queries run in the thread pool.
    body = prometheus_text(get_db(request).session_factory())
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
