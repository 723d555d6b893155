"""``import lxt`` holds the LRP library only: no model loader, GGUF, scikit-learn or
benchmark code (they live in lxt_data / lxt_bench, beside the core package)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

LXT = Path(__file__).resolve().parents[1] / "lxt"
#: top-level modules that only the demo, tests and benchmarks need
NOT_CORE = ("lxt_data", "lxt_bench", "gguf", "sklearn", "scipy", "psutil", "accelerate",
            "matplotlib", "lxt.models", "lxt.bench")


@pytest.mark.parametrize("statement", [
    "import lxt",
    "import lxt, lxt.explicit.functional, lxt.explicit.rules, lxt.explicit.modules, "
    "lxt.explicit.special, lxt.explicit.core, lxt.composites",
])
def test_import_lxt_pulls_in_no_loader_gguf_or_sklearn(statement):
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=LXT.parent).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    bad = [m for m in loaded if any(m == n or m.startswith(n + ".") for n in NOT_CORE)]
    assert bad == []


def test_moved_modules_are_gone_from_the_core_package():
    for name in ("lxt.models", "lxt.bench"):
        code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is not None)"
        assert subprocess.run([sys.executable, "-c", code], cwd=LXT.parent).returncode == 0, name


def test_core_modules_import_data_and_bench_only_lazily():
    """Only inside functions (the command line's `lxt explain` / `lxt bench`)."""
    for path in LXT.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in ("lxt_data", "lxt_bench", "gguf", "sklearn", "psutil"), (
                    f"{path.relative_to(LXT.parent)} imports {name} at module level")


def _import_graph(root: Path) -> dict:
    """``module -> modules it imports`` (at module level or inside a function) within the
    package under ``root`` (``from . import x`` of a submodule counts as importing the
    submodule, not the package)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in names]
                edges.update(subs if len(subs) == len(node.names) else [mod, *subs])
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[name] = {e for e in edges if e in names and e != name}
    return graph


def _cycle(graph: dict):
    """One import cycle of ``graph`` (a list of modules), or None."""
    state = {}

    def visit(u, path):
        state[u] = "open"
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return path[path.index(v):] + [v]
            if v not in state and (found := visit(v, path + [v])):
                return found
        state[u] = "done"
        return None

    return next((c for u in sorted(graph) if u not in state and (c := visit(u, [u]))), None)


def test_the_package_has_no_import_cycle(tmp_path):
    """Not even through imports inside functions (d057acd had rules.base <-> core.opaque)."""
    assert _cycle(_import_graph(LXT)) is None
    # the check finds one where there is one
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from . import a\n")
    assert _cycle(_import_graph(tmp_path / "pkg")) == ["pkg.a", "pkg.b", "pkg.a"]
