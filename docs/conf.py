"""Sphinx configuration of the Data Transfer System documentation.

Built offline with warnings as errors and nitpicky references (``scripts/docs``): every
cross-reference to our own code must resolve.  There is no intersphinx (no network on the
build machines), so references to types of other packages and the standard library are
ignored by the ``nitpick_ignore_regex`` patterns below - and only those.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(REPO / "src"))

project = "Observatory Data Transfer System"
author = "Data Transfer System team"
copyright = "the Data Transfer System team"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "myst_parser",
    "celery.contrib.sphinx",  # documents Celery tasks as functions
    "ccat_docs",  # settings table and CLI reference generated from the code
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# CONVENTIONS-dev.md is shown inside the developer guide (developer.rst), not on its own.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "CONVENTIONS-dev.md"]
templates_path: list[str] = []
html_static_path: list[str] = []
html_theme = "alabaster"
html_title = project
pygments_style = "sphinx"

nitpicky = True

# celery.contrib.sphinx (Celery tasks) needs the class-based autodoc of Sphinx < 9.
autodoc_use_legacy_class_based = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
    # Document every public name, not only those a module lists in __all__.
    "ignore-module-all": True,
}
autodoc_inherit_docstrings = False

# Types of packages we do not document (no intersphinx offline): SQLAlchemy, Celery,
# typing internals, the standard library and the other third-party libraries we use.
_EXTERNAL = (
    "sqlalchemy",
    "celery",
    "kombu",
    "typing",
    "typing_extensions",
    "collections",
    "datetime",
    "pathlib",
    "enum",
    "dataclasses",
    "decimal",
    "uuid",
    "io",
    "_io",
    "os",
    "abc",
    "types",
    "logging",
    "threading",
    "concurrent",
    "contextlib",
    "hashlib",
    "tarfile",
    "subprocess",
    "random",
    "tempfile",
    "queue",
    "json",
    "socket",
    "fastapi",
    "starlette",
    "pydantic",
    "redis",
    "boto3",
    "botocore",
    "structlog",
    "rich",
    "typer",
    "click",
    "httpx",
    "prometheus_client",
    "dynaconf",
)
nitpick_ignore_regex = [
    (r"py:.*", r"(" + "|".join(_EXTERNAL) + r")(\..*)?"),
    # Names that annotations use unqualified (imported at module level).
    (
        r"py:.*",
        r"(Session|Engine|Connection|Mapped|Select|Task|Celery|Path|datetime|date|timedelta|"
        r"Enum|StrEnum|IntEnum|Decimal|UUID|Iterator|Iterable|Sequence|Mapping|Callable|"
        r"Generator|BinaryIO|IO|TextIO|Logger|BoundLogger|Request|Response|Redis|"
        r"ColumnElement|InstrumentedAttribute|DeclarativeBase|MappedAsDataclass|Row|Result|"
        r"ScalarSelect|Subquery|Table|Column|TypeDecorator|Dialect|Exists|BinaryExpression|"
        r"TarInfo|TarFile|Thread|Event|Lock|HTTPException|Counter|Gauge|deque|defaultdict|"
        r"Popen|CompletedProcess|StreamingBody|T|P|R|_T)",
    ),
    # Private helpers (leading underscore) that public signatures mention but that are
    # deliberately not part of the reference, e.g. deletion.base._LOAD_CHUNK.
    (r"py:.*", r"ccat_(data_transfer|ops_db)(\.\w+)*\._\w+"),
    # autodoc splits string annotations of dataclass fields into pieces ('list[dict[str').
    (r"py:.*", r"'.*"),
]

# MyST pages written by other teams (docs/performance.md, the developer conventions) may
# link to files outside the site; those links are not ours to resolve.
suppress_warnings = ["myst.xref_missing", "myst.header"]
myst_heading_anchors = 3

# docs/performance.md belongs to the benchmark work: list it when it is there, and the
# build passes without it.
_PERFORMANCE = DOCS / "performance.md"


def _add_optional_pages(app, docname, source):  # noqa: ANN001 - Sphinx event signature
    if docname == "index" and _PERFORMANCE.exists():
        source[0] = source[0].replace("   developer\n", "   developer\n   performance\n")


def _external_member_names() -> frozenset[str]:
    from celery import Task
    from pydantic import BaseModel
    from sqlalchemy.orm import DeclarativeBase

    declarative = {"metadata", "registry", "type_annotation_map"}  # set per subclass
    return (
        frozenset(dir(Task))
        | frozenset(dir(BaseModel))
        | frozenset(dir(DeclarativeBase))
        | frozenset(declarative)
    )


_EXTERNAL_MEMBERS = _external_member_names()


def _skip_members(app, what, name, obj, skip, options):  # noqa: ANN001
    """The reference documents our functions, classes and their members.  Module-level
    constants, loggers and table aliases are implementation detail; attributes that our
    classes inherit or set from Celery's Task, pydantic's BaseModel or SQLAlchemy's
    DeclarativeBase are documented by those projects (their docstrings use roles this
    site does not have)."""
    if what == "module" and not (callable(obj) or isinstance(obj, type)):
        return True
    if what == "class" and name in _EXTERNAL_MEMBERS:
        own = str(getattr(obj, "__module__", "") or "").startswith(
            ("ccat_data_transfer", "ccat_ops_db")
        )
        if not (callable(obj) and own):
            return True
    return None


def setup(app):  # noqa: ANN001
    app.connect("source-read", _add_optional_pages)
    app.connect("autodoc-skip-member", _skip_members)
