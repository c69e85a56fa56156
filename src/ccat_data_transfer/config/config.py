"""The one place that reads configuration and the environment.

Settings come from ``settings.toml`` next to this module, the environment chosen with
``CCAT_DATA_TRANSFER_ENV`` (default, development, production, test), an optional extra
file named by ``CCAT_DATA_TRANSFER_SETTINGS_FILE``, and environment variables with the
``CCAT_DATA_TRANSFER_`` prefix.  Nothing else in the code reads ``os.environ``.
"""

from __future__ import annotations

from pathlib import Path

from dynaconf import Dynaconf

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


def database_url() -> str:
    """The configured database URL, or the embedded SQLite file inside DATA_DIR."""
    url = str(settings.get("DATABASE_URL", "") or "")
    if url:
        return url
    return f"sqlite:///{data_dir() / 'ops_db.sqlite'}"


def environment_secret(name: str) -> str:
    """A secret that only ever comes from the environment (via the settings layer)."""
    return str(settings.get(name, "") or "")
