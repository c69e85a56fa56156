"""Temporary names: the one rule that says a path component is temporary.

Every write of the system goes to a temporary name first (``.name.tmp-<hex>`` files, the
fixed resume names ``.name.tmp-resume``, work folders such as ``.unpack.tmp-*``) and is
renamed into place only when whole.  The storage hides such names from its listings and
the janitor removes old ones, *with everything under them*.  So a path is temporary as soon
as any of its components is, and no name that enters the system (a filed raw file, a tar
member, a location's root in the topology) may hold such a component: it would be hidden
from the audit and swept away by the janitor.

Room in the house: the bottom (``ccat_ops_db``), so that the topology loader here and
``ccat_data_transfer.core`` (storage, tar code, filing, janitor) share one predicate.
Imports nothing.
"""

from __future__ import annotations

__all__ = ["TEMP_MARK", "is_temporary_name", "temporary_component"]

#: What marks a temporary name: a component starting with "." that holds this.
TEMP_MARK = ".tmp-"


def is_temporary_name(component: str) -> bool:
    """True for one path component that the storage treats as temporary (a hidden name
    holding ``.tmp-``: ``.name.tmp-<hex>``, ``.name.tmp-resume``, ``.unpack.tmp-*``)."""
    return component.startswith(".") and TEMP_MARK in component


def temporary_component(path: str) -> str | None:
    """The first component of the ``/``-separated ``path`` that is temporary
    (:func:`is_temporary_name`), or None when the path holds none."""
    for component in str(path).split("/"):
        if is_temporary_name(component):
            return component
    return None
