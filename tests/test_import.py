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
