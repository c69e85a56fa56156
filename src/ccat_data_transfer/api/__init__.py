"""The REST API (FastAPI): one router module per area, assembled by ``app.create_app``.

Areas: ``filing`` (instruments register files, finish obs units), ``packages`` (read
package state).  Add an area by writing ``api/<area>.py`` with a ``router`` and listing it
in ``app.ROUTER_MODULES``; protect endpoints with ``Depends(require_role("..."))`` from
``api.auth`` and get a DB session with ``Depends(get_session)`` from ``api.deps``.
"""

from ccat_data_transfer.api.app import create_app

__all__ = ["create_app"]
