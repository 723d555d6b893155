"""The published lxt 2.1 test files, unchanged, against this repository's ``lxt.explicit``.

Their code is not part of this repository: the pinned sdist ``lxt==2.1`` (sha256 in
:data:`lxt_data.artefacts.PUBLISHED_LXT`) is fetched once into the lxt cache, verified, and
its ``tests/test_*.py`` are copied byte for byte into a temporary folder and run there with
pytest in a subprocess in which ``import lxt`` is this repository's package (a conftest
written here checks that).  Nothing in them is rewritten.

The published tests draw unseeded random inputs, and several fail for a few draws on the
published package itself (epsilon-rule, layer-norm, matmul and mean tests: 3, 2, 4 and 1 of
100 seeds, measured with torch.manual_seed(0..99) before each test; against ours the same
seeds fail, plus 2 of 100 for test_linear, where the sign-aware stabiliser differs).  So the
conftest written here seeds torch with 0 before every test: the run is deterministic.

Known outcomes, each with its reason:

- ``test_functional.py::test_softmax`` calls ``softmax(x, -1, torch.float32, False)`` with
  ``False`` in the ``temperature`` slot; the published package divides by it and fails
  (NaN).  lxt reads a bool there as the ``inplace`` flag of the older call sites (no
  effect), keeps temperature 1.0 and warns: it passes.
- ``test_functional.py::test_sum`` compares with ``a * R / (a + b + eps)``: the published
  stabiliser adds ``+eps`` whatever the sign.  lxt's one stabiliser is sign-aware
  (``z + eps * sign(z)``, DESIGN.md), so where ``a + b`` is negative and close to zero the
  two differ by ``2 eps / |a + b|`` relative, and with relevances of 1e3-1e4 in float32 that
  exceeds the test's ``atol=1e-4``.  Expected to fail (strict xfail: if it ever passes, the
  stabiliser changed); :func:`test_published_sum_inputs_with_the_sign_aware_reference` runs
  the same computation against the sign-aware formula.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

KNOWN_FAILURES = {
    "test_functional.py::test_sum": (
        "published reference uses z + eps; lxt's stabiliser is sign-aware, z + eps * sign(z) "
        "(DESIGN.md), which differs where a + b < 0 is close to zero"),
}

CONFTEST = f'''
import pathlib

import pytest
import torch

import lxt

OURS = pathlib.Path({str(REPO / "lxt")!r})
assert pathlib.Path(lxt.__file__).resolve().parent == OURS, (
    f"import lxt resolved to {{lxt.__file__}}, not to {{OURS}}")

KNOWN_FAILURES = {KNOWN_FAILURES!r}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(items):
    for item in items:
        reason = KNOWN_FAILURES.get(item.nodeid)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
'''


@pytest.fixture(scope="module")
def published_tests(tmp_path_factory) -> Path:
    from lxt_data import artefacts

    try:
        sdist = artefacts.fetch(artefacts.PUBLISHED_LXT)
    except artefacts.FetchError as err:
        pytest.skip(f"the published lxt 2.1 sdist cannot be had: {str(err).splitlines()[0]}")
    folder = tmp_path_factory.mktemp("published-lxt-2.1")
    with tarfile.open(sdist) as tar:
        for name in ("test_functional.py", "test_rules.py", "test_modules.py"):
            data = tar.extractfile(tar.getmember(f"lxt-2.1/tests/{name}")).read()
            (folder / name).write_bytes(data)
    (folder / "conftest.py").write_text(CONFTEST)
    return folder


def run_published(folder: Path, *files: str) -> dict[str, str]:
    """Run the published files with pytest in a subprocess; ``{nodeid: outcome}``."""
    report = folder / f"report-{'-'.join(Path(f).stem for f in files)}.xml"
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
         "ignore::UserWarning", f"--junitxml={report}", *files],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=1800)
    if not report.is_file():
        pytest.fail(f"pytest did not run the published tests:\n{proc.stdout[-3000:]}")
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        nodeid = f"{case.get('classname').split('.')[-1]}.py::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            outcome = "failed"
        elif "skipped" in kinds:
            skipped = case.find("skipped")
            outcome = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
        else:
            outcome = "passed"
        outcomes[nodeid] = outcome
    print(proc.stdout[-2000:])
    return outcomes


def test_published_functional_and_rules_tests(published_tests):
    outcomes = run_published(published_tests, "test_functional.py", "test_rules.py")
    expected = {f"test_functional.py::test_{n}": "passed"
                for n in ("softmax", "matmul", "linear", "mean", "layernorm", "normalize")}
    expected["test_functional.py::test_sum"] = "xfailed"
    expected["test_rules.py::test_epsilon_rule"] = "passed"
    assert outcomes == expected


@pytest.mark.slow
def test_published_modules_tests(published_tests):
    """LayerNorm / Linear built from the torch module, CP-LRP MultiheadAttention with the
    explicit Composite (large tensors: 32 x 500 x 4092, about a minute on 2 cores)."""
    outcomes = run_published(published_tests, "test_modules.py")
    assert outcomes == {f"test_modules.py::test_{n}": "passed"
                        for n in ("LayerNorm", "Linear", "MultiheadAttention")}


def test_published_sum_inputs_with_the_sign_aware_reference():
    """test_sum's computation (float32, eps 1e-9, both orders of inplace), compared with the
    sign-aware epsilon rule instead of ``z + eps``: exact."""
    import lxt.explicit.functional as lf
    from conftest import stab

    torch.manual_seed(0)
    epsilon = 1e-9
    a = torch.randn(16, 10, 32, requires_grad=True)
    b = torch.randn(16, 10, 32, requires_grad=True)
    R = torch.randn(16, 10, 32)
    z = (a + b).detach()
    for inplace in (False, True):
        ra, rb = torch.autograd.grad(lf.add2(a, b, inplace, epsilon), (a, b), R)
        torch.testing.assert_close(ra, a.detach() * (R / stab(z, epsilon)), rtol=0, atol=0)
        torch.testing.assert_close(rb, b.detach() * (R / stab(z, epsilon)), rtol=0, atol=0)
    # and where it differs from the published formula: only at negative sums
    published = a.detach() * (R / (z + epsilon))
    differs = ~torch.isclose(ra, published, rtol=0, atol=1e-4)
    assert differs.any() and (z[differs] < 0).all()
