"""The import contract: every import statement in ``src/`` obeys the house's direction.

interfaces (``api``, ``cli``, ``__main__``) -> ``operations`` -> stages (filing, packaging,
transfer, archive, staging, deletion, buffers, fixity) -> ``core`` (and the package root,
for ``__version__``) -> ``ccat_ops_db``.  Nothing imports upward; ``ccat_ops_db`` imports
nothing of ``ccat_data_transfer``; a stage reaches another stage only through a module
that stage lists in ``PUBLIC`` (a tuple in its ``__init__.py``); no module cycles (imports
inside functions count); no underscore name crosses a module boundary; nothing imports a
shim (the modules kept only for the user's document); an import inside a function only in
``cli``/``api`` (start-up speed) or marked ``# lazy: <reason>``.

The checker reads the source with :mod:`ast` (nothing is imported), so a violation hidden
in a function body that never runs is still found.  The last tests build a small package
in ``tmp_path`` with a cycle and an upward import and show the checker reports both.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
ROOTS = ("ccat_data_transfer", "ccat_ops_db")
APP = "ccat_data_transfer"

STAGES = (
    "filing",
    "packaging",
    "transfer",
    "archive",
    "staging",
    "deletion",
    "buffers",
    "fixity",
)
#: The modules kept only so that the user's document and README keep working.
SHIMS = (
    f"{APP}.database",
    f"{APP}.queue_discovery",
    f"{APP}.operation_types",
    f"{APP}.buffer_manager",
    f"{APP}.config",
    f"{APP}.config.config",
    f"{APP}.deletion_manager",
    f"{APP}.staging_manager",
    f"{APP}.transfer_manager",
)
#: Layer ranks: a module may import only modules of its own rank or lower.
RANKS = {"shim": 5, "interfaces": 4, "operations": 3, "stage": 2, "core": 1, "ops_db": 0}
#: Packages whose functions may import lazily without a ``# lazy:`` note.
LAZY_OK = (f"{APP}.cli", f"{APP}.api")
LAZY_NOTE = re.compile(r"#\s*lazy:\s*\S")


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> str | None:
    """The layer of a module, or None for one the contract does not place."""
    if _under(module, "ccat_ops_db"):
        return "ops_db"
    if module in SHIMS:
        return "shim"
    if module == APP or _under(module, f"{APP}.core"):
        return "core"
    if any(_under(module, f"{APP}.{s}") for s in STAGES):
        return "stage"
    if _under(module, f"{APP}.operations"):
        return "operations"
    if any(_under(module, p) for p in (f"{APP}.api", f"{APP}.cli", f"{APP}.__main__")):
        return "interfaces"
    return None


def stage_of(module: str) -> str | None:
    for s in STAGES:
        if _under(module, f"{APP}.{s}"):
            return s
    return None


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # most specific project module imported
    names: tuple[str, ...]  # names taken with ``from target import ...`` (not modules)
    line: int
    in_function: bool
    lazy_note: bool
    path: str  # relative to the source root

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class PrivateAccess:
    source: str
    target: str
    name: str
    line: int
    path: Path


@dataclass
class Project:
    root: Path
    modules: dict[str, Path] = field(default_factory=dict)
    packages: set[str] = field(default_factory=set)
    imports: list[Import] = field(default_factory=list)
    private_attributes: list[PrivateAccess] = field(default_factory=list)
    public: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _module_name(root: Path, path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _resolve_relative(source: str, is_package: bool, level: int, module: str | None) -> str:
    base = source.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _public_of(tree: ast.Module) -> tuple[str, ...] | None:
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == "PUBLIC" for t in targets):
            return tuple(ast.literal_eval(node.value))
    return None


class _Reader(ast.NodeVisitor):
    """Collects one module's imports (with their function nesting) and ``mod._name``."""

    def __init__(self, project: Project, source: str, is_package: bool, path: Path, lines):
        self.project = project
        self.source = source
        self.is_package = is_package
        self.path = path
        self.lines = lines
        self.depth = 0
        self.module_aliases: dict[str, str] = {}

    def _project_module(self, name: str) -> str | None:
        """The longest prefix of ``name`` that is a module of the project."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.project.modules:
                return candidate
        return None

    def _note(self, node: ast.stmt) -> bool:
        end = getattr(node, "end_lineno", node.lineno) or node.lineno
        return any(LAZY_NOTE.search(self.lines[n - 1]) for n in range(node.lineno, end + 1))

    def _add(self, node: ast.stmt, target: str, names: tuple[str, ...]) -> None:
        self.project.imports.append(
            Import(
                self.source,
                target,
                names,
                node.lineno,
                self.depth > 0,
                self._note(node),
                str(self.path.relative_to(self.project.root)),
            )
        )

    def visit_FunctionDef(self, node):  # noqa: N802 (ast visitor name)
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_Import(self, node: ast.Import):  # noqa: N802
        for alias in node.names:
            target = self._project_module(alias.name)
            if target is None:
                continue
            self._add(node, target, ())
            if alias.asname:
                self.module_aliases[alias.asname] = target

    def visit_ImportFrom(self, node: ast.ImportFrom):  # noqa: N802
        if node.level:
            base = _resolve_relative(self.source, self.is_package, node.level, node.module)
        else:
            base = node.module or ""
        if base.split(".")[0] not in ROOTS:
            return
        plain: list[str] = []
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in self.project.modules:
                self._add(node, submodule, ())
                self.module_aliases[alias.asname or alias.name] = submodule
            else:
                plain.append(alias.name)
        if plain or not node.names:
            target = self._project_module(base)
            if target is not None:
                self._add(node, target, tuple(plain))

    def visit_Attribute(self, node: ast.Attribute):  # noqa: N802
        if (
            isinstance(node.value, ast.Name)
            and node.value.id in self.module_aliases
            and node.attr.startswith("_")
            and not (node.attr.startswith("__") and node.attr.endswith("__"))
        ):
            self.project.private_attributes.append(
                PrivateAccess(
                    self.source,
                    self.module_aliases[node.value.id],
                    node.attr,
                    node.lineno,
                    self.path,
                )
            )
        self.generic_visit(node)


def read_project(root: Path) -> Project:
    """Every module under ``root``'s project packages, and every import statement in them."""
    project = Project(root)
    files: list[tuple[str, bool, Path]] = []
    for top in ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            name, is_package = _module_name(root, path)
            project.modules[name] = path
            if is_package:
                project.packages.add(name)
            files.append((name, is_package, path))
    for name, is_package, path in files:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        if is_package:
            public = _public_of(tree)
            if public is not None:
                project.public[name] = public
        _Reader(project, name, is_package, path, text.splitlines()).visit(tree)
    return project


# -- the checks: each returns a list of lines, one per offender ---------------------------


def unplaced_modules(project: Project) -> list[str]:
    return sorted(m for m in project.modules if layer(m) is None)


def upward_imports(project: Project) -> list[str]:
    found = []
    for imp in project.imports:
        src_layer, dst_layer = layer(imp.source), layer(imp.target)
        if src_layer is None or dst_layer is None:
            continue
        if imp.source.startswith("ccat_ops_db") and imp.target.startswith(APP):
            found.append(f"{imp.where()}: ccat_ops_db imports {imp.target}")
        elif RANKS[dst_layer] > RANKS[src_layer]:
            found.append(
                f"{imp.where()}: {imp.source} ({src_layer}) imports {imp.target} ({dst_layer})"
            )
    return sorted(set(found))


def cross_stage_imports(project: Project) -> list[str]:
    found = []
    for imp in project.imports:
        mine, theirs = stage_of(imp.source), stage_of(imp.target)
        if mine is None or theirs is None or mine == theirs:
            continue
        public = project.public.get(f"{APP}.{theirs}", ())
        if not any(_under(imp.target, f"{APP}.{theirs}.{p}") for p in public):
            found.append(
                f"{imp.where()}: stage {mine} imports {imp.target}, not in "
                f"{APP}.{theirs}.PUBLIC = {public!r}"
            )
    return sorted(set(found))


def module_graph(project: Project) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in project.imports:
        if imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def cycles(project: Project) -> list[list[str]]:
    """One cycle path (first module repeated at the end) per strongly connected component."""
    graph = module_graph(project)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(start: str) -> None:  # iterative Tarjan
        nonlocal counter
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for node in sorted(set(graph) | {t for ts in graph.values() for t in ts}):
        if node not in index:
            strongconnect(node)

    paths = []
    for component in components:
        members = set(component)
        first = component[0]
        # breadth-first from first back to first, inside the component
        previous: dict[str, str] = {}
        queue = [first]
        found = None
        while queue and found is None:
            node = queue.pop(0)
            for child in sorted(graph.get(node, ())):
                if child not in members:
                    continue
                if child == first:
                    found = node
                    break
                if child not in previous:
                    previous[child] = node
                    queue.append(child)
        path = [first]
        node = found
        while node is not None and node != first:
            path.append(node)
            node = previous[node]
        paths.append([first, *reversed(path[1:]), first])
    return sorted(paths)


def _where_imports(project: Project, source: str, target: str) -> str:
    lines = [
        f"{i.line}{' (in a function)' if i.in_function else ''}"
        for i in project.imports
        if i.source == source and i.target == target
    ]
    return f"{source} -> {target} (line {', '.join(lines)})"


def cycle_reports(project: Project) -> list[str]:
    reports = []
    for path in cycles(project):
        steps = [_where_imports(project, a, b) for a, b in zip(path, path[1:], strict=False)]
        reports.append(" -> ".join(path) + "\n      " + "\n      ".join(steps))
    return reports


def private_imports(project: Project) -> list[str]:
    found = []
    for imp in project.imports:
        for name in imp.names:
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                found.append(f"{imp.where()}: {imp.source} imports {imp.target}.{name}")
    for access in project.private_attributes:
        if access.target != access.source:
            rel = access.path.relative_to(project.root)
            found.append(
                f"{rel}:{access.line}: {access.source} reads {access.target}.{access.name}"
            )
    return sorted(set(found))


def shim_imports(project: Project) -> list[str]:
    found = []
    for imp in project.imports:
        if imp.target in SHIMS and imp.source not in SHIMS:
            found.append(f"{imp.where()}: {imp.source} imports the shim {imp.target}")
        elif imp.target in SHIMS and imp.source in SHIMS and not _under(imp.source, imp.target):
            found.append(f"{imp.where()}: the shim {imp.source} imports the shim {imp.target}")
    return sorted(set(found))


def function_imports(project: Project) -> list[Import]:
    return [i for i in project.imports if i.in_function]


def unjustified_function_imports(project: Project) -> list[str]:
    return sorted(
        f"{i.where()}: {i.source} imports {i.target} inside a function"
        for i in function_imports(project)
        if not i.lazy_note and not any(_under(i.source, p) for p in LAZY_OK)
    )


def public_declarations(project: Project) -> list[str]:
    """Every stage declares PUBLIC, and every name in it is a module of that stage."""
    found = [
        f"{APP}.{s} declares no PUBLIC (a tuple of the modules other stages may import)"
        for s in STAGES
        if f"{APP}.{s}" in project.modules and f"{APP}.{s}" not in project.public
    ]
    for package, names in project.public.items():
        for name in names:
            if f"{package}.{name}" not in project.modules:
                found.append(f"{package}.PUBLIC names {name!r}, which is no module of it")
    return found


# -- the contract on the real source ------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> Project:
    return read_project(SRC)


def _fail(title: str, offenders: list[str]) -> str:
    return f"{title} ({len(offenders)}):\n  " + "\n  ".join(offenders)


def test_every_module_has_a_layer(project):
    assert not unplaced_modules(project), _fail(
        "modules in no layer of the import contract (place them in tests/test_import_contract.py)",
        unplaced_modules(project),
    )


def test_no_module_imports_a_higher_layer(project):
    offenders = upward_imports(project)
    assert not offenders, _fail(
        "upward imports (interfaces -> operations -> stages -> core -> ccat_ops_db)", offenders
    )


def test_a_stage_imports_another_stage_only_through_its_public_modules(project):
    offenders = cross_stage_imports(project)
    assert not offenders, _fail(
        "stage imports of another stage's non-public module (declare in its PUBLIC, "
        "or move the shared code to core)",
        offenders,
    )


def test_every_stage_declares_its_public_modules(project):
    offenders = public_declarations(project)
    assert not offenders, _fail("stage PUBLIC declarations missing or wrong", offenders)


def test_no_import_cycle_between_modules_counting_imports_in_functions(project):
    offenders = cycle_reports(project)
    assert not offenders, _fail("import cycles", offenders)


def test_no_underscore_name_is_imported_from_another_module(project):
    offenders = private_imports(project)
    assert not offenders, _fail(
        "private (underscore) names used across modules: make them public or move the code",
        offenders,
    )


def test_nothing_in_src_imports_a_shim(project):
    offenders = shim_imports(project)
    assert not offenders, _fail(
        "imports of a shim (kept for the user's document only; import the real module)",
        offenders,
    )


def test_imports_inside_functions_only_in_cli_api_or_marked_lazy(project):
    offenders = unjustified_function_imports(project)
    assert not offenders, _fail(
        "imports inside functions outside cli/api without a '# lazy: <reason>' note "
        "(hoist them; a lazy import must not hide a cycle)",
        offenders,
    )


def test_ccat_ops_db_imports_nothing_of_ccat_data_transfer(project):
    offenders = [
        f"{i.where()}: {i.source} imports {i.target}"
        for i in project.imports
        if _under(i.source, "ccat_ops_db") and _under(i.target, APP)
    ]
    assert not offenders, _fail("ccat_ops_db importing ccat_data_transfer", offenders)


# -- the checker itself catches what it must ----------------------------------------------


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def bad_project(tmp_path) -> Project:
    """A tiny project with one of each violation the contract forbids."""
    for package in ("", "/core", "/operations", "/transfer", "/archive", "/api", "/cli"):
        _write(tmp_path, f"ccat_data_transfer{package}/__init__.py", "")
    _write(tmp_path, "ccat_data_transfer/archive/__init__.py", 'PUBLIC = ("proof",)\n')
    _write(tmp_path, "ccat_ops_db/__init__.py", "")
    _write(tmp_path, "ccat_ops_db/models.py", "from ccat_data_transfer.core import room\n")
    # a cycle hidden by an import inside a function
    _write(
        tmp_path,
        "ccat_data_transfer/api/dashboard.py",
        "from ccat_data_transfer.api.login import router\ntemplates = 1\n",
    )
    _write(
        tmp_path,
        "ccat_data_transfer/api/login.py",
        "def page():\n    from ccat_data_transfer.api.dashboard import templates\n"
        "    return templates\nrouter = 2\n",
    )
    # core imports upward, an underscore name, lazily without a note
    _write(
        tmp_path,
        "ccat_data_transfer/core/room.py",
        "def largest():\n    from ccat_data_transfer.operations.metrics import _last\n"
        "    return _last\n",
    )
    _write(tmp_path, "ccat_data_transfer/operations/metrics.py", "_last = 0\n")
    # a stage reaching into another stage's non-public module; a public one is fine
    _write(
        tmp_path,
        "ccat_data_transfer/transfer/cycle.py",
        "from ccat_data_transfer.archive import cycle\nfrom ccat_data_transfer.archive.proof "
        "import prove\nimport ccat_data_transfer.archive.proof as p\nx = p._secret\n",
    )
    _write(tmp_path, "ccat_data_transfer/archive/cycle.py", "")
    _write(tmp_path, "ccat_data_transfer/archive/proof.py", "def prove(): ...\n_secret = 1\n")
    # a shim, imported from src
    _write(tmp_path, "ccat_data_transfer/database.py", "")
    _write(
        tmp_path,
        "ccat_data_transfer/cli/core.py",
        "from ccat_data_transfer import database\n",
    )
    return read_project(tmp_path)


def test_checker_reports_a_cycle_hidden_in_a_function_with_its_path(bad_project):
    assert cycles(bad_project) == [
        [
            "ccat_data_transfer.api.dashboard",
            "ccat_data_transfer.api.login",
            "ccat_data_transfer.api.dashboard",
        ]
    ]
    assert "(in a function)" in cycle_reports(bad_project)[0]


def test_checker_reports_a_longer_cycle_through_layers(tmp_path):
    for name, target in (("a", "b"), ("b", "c"), ("c", "a")):
        _write(tmp_path, f"ccat_data_transfer/core/{name}.py", f"from . import {target}\n")
    _write(tmp_path, "ccat_data_transfer/__init__.py", "")
    _write(tmp_path, "ccat_data_transfer/core/__init__.py", "")
    _write(tmp_path, "ccat_ops_db/__init__.py", "")
    project = read_project(tmp_path)
    assert cycles(project) == [
        [
            "ccat_data_transfer.core.a",
            "ccat_data_transfer.core.b",
            "ccat_data_transfer.core.c",
            "ccat_data_transfer.core.a",
        ]
    ]


def test_checker_reports_an_upward_import_and_ops_db_importing_the_app(bad_project):
    found = upward_imports(bad_project)
    assert any(
        "ccat_data_transfer.core.room (core) imports ccat_data_transfer.operations.metrics "
        "(operations)" in line
        for line in found
    ), found
    assert any("ccat_ops_db imports ccat_data_transfer.core.room" in line for line in found)


def test_checker_reports_a_cross_stage_import_of_a_non_public_module(bad_project):
    found = cross_stage_imports(bad_project)
    assert len(found) == 1 and "imports ccat_data_transfer.archive.cycle" in found[0], found


def test_checker_reports_underscore_names_imported_or_read_across_modules(bad_project):
    found = private_imports(bad_project)
    assert any("imports ccat_data_transfer.operations.metrics._last" in f for f in found)
    assert any("reads ccat_data_transfer.archive.proof._secret" in f for f in found)
    assert len(found) == 2, found


def test_checker_reports_a_shim_import_and_an_unmarked_lazy_import(bad_project):
    assert [s.split(": ", 1)[1] for s in shim_imports(bad_project)] == [
        "ccat_data_transfer.cli.core imports the shim ccat_data_transfer.database"
    ]
    unjustified = unjustified_function_imports(bad_project)
    # the lazy import in api/login.py is allowed (api), the one in core/room.py is not
    assert len(unjustified) == 1 and "core.room" in unjustified[0], unjustified
