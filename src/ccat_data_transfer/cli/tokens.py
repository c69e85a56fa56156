"""Token commands (CLI layer): create, list and revoke API tokens.

A token carries its own role and, for an ``instrument`` token, its required scope (the
instrument whose SOURCE locations it may file into).  The secret is printed once at
creation; only its SHA-256 is stored, so ``token list`` can never show it.
"""

from __future__ import annotations

import typer

from ccat_data_transfer.cli.common import app, console, err_console, get_db, print_listing

token_app = typer.Typer(help="API tokens for the REST API and the dashboard.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    user: str = typer.Option(..., "--user", help="User name (created if new)."),
    role: str = typer.Option(..., "--role", help="admin, instrument, scientist or viewer."),
    instrument: str | None = typer.Option(
        None,
        "--instrument",
        help="Required with --role instrument: the token files only into this instrument's "
        "SOURCE locations and finishes only its obs units.",
    ),
    name: str | None = typer.Option(None, "--name", help="A label for the token."),
    expires_in_days: int | None = typer.Option(None, "--expires-in-days", min=1),
) -> None:
    """Create an API token; it is printed once and only its hash is stored."""
    from ccat_data_transfer.api.auth import create_api_token

    with get_db().session_scope() as session:
        token = create_api_token(
            session, user, role, name=name, expires_in_days=expires_in_days, instrument=instrument
        )
    scope = f", instrument {instrument}" if instrument else ""
    err_console.print(
        f"token for {user} (role {role}{scope}); store it now, it is not shown again:",
        highlight=False,
    )
    console.print(token, highlight=False, soft_wrap=True)


@token_app.command("list")
def token_list() -> None:
    """List the tokens: id, user, role, scope, created, last used, revoked (never secrets)."""
    from ccat_data_transfer.api.auth import list_api_tokens

    with get_db().session_scope() as session:
        tokens = list_api_tokens(session)
    print_listing(
        tokens,
        as_json=False,
        title=None,
        columns=("id", "user", "name", "role", "scope", "created", "last used", "revoked"),
        row=lambda t: (
            str(t["id"]),
            t["user"],
            t["name"],
            t["role"],
            t["scope"] or "-",
            t["created_at"][:19],
            (t["last_used_at"] or "never")[:19],
            "yes" if t["revoked"] else "no",
        ),
    )


@token_app.command("revoke")
def token_revoke(
    token_id: int = typer.Argument(..., help="The token's id (see token list)."),
) -> None:
    """Revoke a token: requests with it are refused (401) from now on."""
    from ccat_data_transfer.api.auth import revoke_api_token

    with get_db().session_scope() as session:
        changed = revoke_api_token(session, token_id)
    console.print(f"token {token_id} {'revoked' if changed else 'was already revoked'}")
