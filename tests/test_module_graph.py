"""The package's module graph: every module imports on its own, no import cycle (counting the
imports inside functions, which only hide a cycle until the call), and no private name crosses a
package boundary."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "quantfw"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported quantfw module, names imported from it, line) of every import in the file."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "quantfw"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if base.split(".")[0] == "quantfw":
                found.append((base, [a.name for a in node.names], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for base, names, _ in _imports(m, path):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in mods] or [base]
            graph[m] |= {owner(t) for t in targets} - {m, ""}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_every_module_imports_fresh_on_its_own():
    """Each module imported with no other quantfw module loaded before it (torch stays cached)."""
    names = sorted(m for m in _modules() if m != "quantfw.__main__")
    script = textwrap.dedent(
        """
        import importlib, sys
        failed = []
        for name in sys.argv[1:]:
            for loaded in [m for m in sys.modules if m == "quantfw" or m.startswith("quantfw.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as e:
                failed.append(f"{name}: {type(e).__name__}: {e}")
        print("\\n".join(failed))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_no_private_name_is_imported_across_packages():
    """`_x` names (and `_x` modules) stay inside their package (quantfw.<package>)."""
    bad = []
    for m, path in _modules().items():
        here = ".".join(m.split(".")[:2])
        for base, names, line in _imports(m, path):
            if ".".join(base.split(".")[:2]) == here:
                continue
            private = [p for p in base.split(".") if p.startswith("_")] + [
                n for n in names if n.startswith("_")
            ]
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {base}")
    assert bad == []
