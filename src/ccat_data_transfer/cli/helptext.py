"""Clean ``--help`` texts: the one place that turns the commands' docstrings (written in
reStructuredText for the API reference) into plain text, and keeps type labels off flags.

Room in the house: CLI layer.  :func:`clean_app_help` runs once, after every command
module has registered its commands: each command's and group's help (its ``help=`` or its
docstring) and each option's ``help=`` lose their RST markup (````--site```` becomes
```--site```, ``:func:`~a.b.c``` becomes ``c``) and the line breaks inside a paragraph.
Typer 0.29's rich help shows an option's type (``<bool>``) even for a flag, which takes no
value; :func:`_flags_show_no_type` removes it there.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import typer

# :role:`text <target>`, :role:`~pkg.mod.name`, :role:`name` (with an optional domain).
_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``")


def _role_text(match: re.Match[str]) -> str:
    body = match.group(1).strip()
    titled = re.fullmatch(r"(.+?)\s*<[^>]+>", body)
    if titled:
        return titled.group(1)
    if body.startswith("~"):
        return body[1:].rsplit(".", 1)[-1]
    return body


def plain(text: Any) -> Any:
    """``text`` without RST markup, each paragraph on one line (anything but a string, such
    as None or typer's unset-value placeholder, is returned as it is)."""
    if not isinstance(text, str):
        return text
    text = _ROLE.sub(_role_text, inspect.cleandoc(text))
    text = _LITERAL.sub(r"`\1`", text)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def _clean_parameters(callback: Any) -> None:
    """The ``help=`` of every typer Option/Argument declared as a default of ``callback``."""
    if callback is None:
        return
    for parameter in inspect.signature(callback).parameters.values():
        info = parameter.default
        if isinstance(info, typer.models.ParameterInfo) and info.help:
            info.help = plain(info.help)


def _given(help_text: Any) -> str | None:
    """A help text given explicitly (typer marks an unset one with a placeholder)."""
    return help_text if isinstance(help_text, str) else None


def _clean_typer(app: typer.Typer) -> None:
    app.info.help = plain(app.info.help)
    if app.registered_callback is not None:
        callback = app.registered_callback
        doc = _given(callback.help) or inspect.getdoc(callback.callback)
        if doc:  # else the group's help comes from the Typer's own (cleaned above)
            callback.help = plain(doc)
        _clean_parameters(callback.callback)
    for command in app.registered_commands:
        command.help = plain(_given(command.help) or inspect.getdoc(command.callback))
        _clean_parameters(command.callback)
    for group in app.registered_groups:
        group.help = plain(group.help)
        if group.typer_instance is not None:
            _clean_typer(group.typer_instance)


def _flags_show_no_type() -> None:
    """A flag's row in the rich help shows no ``<bool>``: typer 0.29's
    ``TyperOption.display_type_rich`` labels every option with its type (older typer has
    no such method and shows none)."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - a typer without the class
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_flags_show_no_type", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._flags_show_no_type = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich


def clean_app_help(app: typer.Typer) -> None:
    """Plain help texts for every command, group and option of ``app``; no type on flags."""
    _clean_typer(app)
    _flags_show_no_type()
