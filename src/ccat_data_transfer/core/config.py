"""The one place that reads configuration and the environment.

Settings come from ``settings.toml`` next to this module, the environment chosen with
``CCAT_DATA_TRANSFER_ENV`` (default, development, production, test), an optional extra
file named by ``CCAT_DATA_TRANSFER_SETTINGS_FILE``, and environment variables with the
``CCAT_DATA_TRANSFER_`` prefix.  Nothing else in the code reads ``os.environ``.
"""

from __future__ import annotations

import os
from pathlib import Path

from dynaconf import Dynaconf

from ccat_data_transfer.core.errors import ConfigurationError

_HERE = Path(__file__).resolve().parent

settings = Dynaconf(
    envvar_prefix="CCAT_DATA_TRANSFER",
    env_switcher="CCAT_DATA_TRANSFER_ENV",
    settings_files=[str(_HERE / "settings.toml")],
    includes_for_dynaconf=None,
    environments=True,
    default_env="default",
    env="default",
    load_dotenv=False,
    merge_enabled=True,
    envvar="CCAT_DATA_TRANSFER_SETTINGS_FILE",
)


def data_dir() -> Path:
    """The embedded mode's data folder, as an absolute path."""
    return Path(str(settings.DATA_DIR)).expanduser().resolve()


#: The URL schemes a DATABASE_URL may use, and the driver each one means.  ``postgresql://``
#: and ``postgres://`` (the forms most people write) mean psycopg 3, the driver installed.
_DATABASE_SCHEMES = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite+pysqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


def normalise_database_url(url: str) -> str:
    """``url`` with the driver this installation has: ``postgresql://`` and ``postgres://``
    become ``postgresql+psycopg://``.  Any other scheme (``mysql://``, ``postgresql+psycopg2://``)
    is a ConfigurationError naming the supported ones; the URL itself is not repeated (it
    may hold a password)."""
    scheme, sep, rest = url.partition("://")
    driver = _DATABASE_SCHEMES.get(scheme.lower()) if sep else None
    if driver is None:
        shown = f"scheme {scheme!r}" if sep else "a value that is not a URL"
        raise ConfigurationError(
            f"DATABASE_URL has {shown}; supported: sqlite:///PATH, "
            "postgresql://USER:PASSWORD@HOST/DB (also postgres:// or postgresql+psycopg://)"
        )
    return f"{driver}://{rest}"


def database_url() -> str:
    """The configured database URL (normalised, see :func:`normalise_database_url`), or
    the embedded SQLite file inside DATA_DIR."""
    url = str(settings.get("DATABASE_URL", "") or "")
    if url:
        return normalise_database_url(url)
    return f"sqlite:///{data_dir() / 'ops_db.sqlite'}"


def environment_secret(name: str) -> str:
    """A secret that only ever comes from the environment (via the settings layer)."""
    return str(settings.get(name, "") or "")


def child_environment(**extra: str) -> dict[str, str]:
    """The environment for a tool this process runs (xrdcp, ssh, ...): this process's
    own, with ``extra`` set on top."""
    return {**os.environ, **extra}
