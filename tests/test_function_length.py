"""No function in src/ spans more than about 80 lines.

A long function is split into named phases (parse / validate / apply; DB phase / storage
phase / DB phase), each a function of its own, so a reader sees the steps by their names.
The span counts every line from ``def`` to the last line of the body, docstring included.
Alembic migrations are generated code and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGES = ("ccat_data_transfer", "ccat_ops_db")
MAX_LINES = 80

# Functions allowed to be longer, with the reason.  Keep it empty if at all possible.
ALLOWED: dict[str, str] = {}


def _source_files() -> list[Path]:
    """Every Python file of the two packages, migrations left out."""
    files: list[Path] = []
    for package in PACKAGES:
        for path in sorted((SRC / package).rglob("*.py")):
            if "migrations" in path.relative_to(SRC).parts:
                continue
            files.append(path)
    return files


def _long_functions() -> list[tuple[str, int]]:
    """(module:qualified name, span) of every function longer than MAX_LINES."""
    found: list[tuple[str, int]] = []
    for path in _source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module = path.relative_to(SRC).as_posix()
        stack: list[tuple[ast.AST, str]] = [(node, "") for node in tree.body]
        while stack:
            node, prefix = stack.pop()
            if isinstance(node, ast.ClassDef):
                stack.extend((child, f"{prefix}{node.name}.") for child in node.body)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{node.name}"
                span = node.end_lineno - node.lineno + 1
                if span > MAX_LINES:
                    found.append((f"{module}:{name}", span))
                stack.extend((child, f"{name}.") for child in node.body)
    return sorted(found, key=lambda item: -item[1])


def test_source_files_are_found() -> None:
    """The walk sees both packages, so an empty result means something."""
    modules = {path.relative_to(SRC).parts[0] for path in _source_files()}
    assert modules == set(PACKAGES)


def test_no_function_in_src_spans_more_than_80_lines() -> None:
    """Every function and method of src/ (migrations aside) spans at most 80 lines."""
    too_long = [(name, span) for name, span in _long_functions() if name not in ALLOWED]
    listing = "\n".join(f"  {span:4d}  {name}" for name, span in too_long)
    assert not too_long, f"functions over {MAX_LINES} lines:\n{listing}"


def test_allow_list_names_only_functions_that_are_still_long() -> None:
    """An allow-list entry whose function got short is removed, so the list stays true."""
    long_names = {name for name, _ in _long_functions()}
    stale = sorted(set(ALLOWED) - long_names)
    assert not stale, f"allow-list entries no longer over {MAX_LINES} lines: {stale}"
