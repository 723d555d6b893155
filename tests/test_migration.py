"""docs/migration.md: every marked snippet runs (the *after* code, and the published code
that runs unchanged on lxt.explicit), each in a fresh namespace after the page's setup."""
import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "migration.md"
MARKED = re.compile(r"<!-- test: (setup|before|after) -->\n```python\n(.*?)```", re.S)


def _snippets():
    text = PAGE.read_text(encoding="utf-8")
    found = [(m.group(1), m.group(2), text[:m.start()].count("\n") + 1) for m in MARKED.finditer(text)]
    setup = [code for kind, code, _ in found if kind == "setup"]
    assert len(setup) == 1, "docs/migration.md needs exactly one setup snippet"
    return setup[0], [(kind, code, line) for kind, code, line in found if kind != "setup"]


SETUP, SNIPPETS = _snippets()


def test_the_page_has_snippets_of_both_kinds():
    kinds = [kind for kind, _, _ in SNIPPETS]
    assert kinds.count("after") >= 6 and kinds.count("before") >= 3


@pytest.mark.parametrize("kind,code,line", SNIPPETS,
                         ids=[f"{kind}-line{line}" for kind, _, line in SNIPPETS])
def test_snippet_runs(kind, code, line):
    namespace = {"__name__": "migration_snippet"}
    exec(compile(SETUP, f"{PAGE.name}:setup", "exec"), namespace)
    exec(compile(code, f"{PAGE.name}:{line}", "exec"), namespace)
