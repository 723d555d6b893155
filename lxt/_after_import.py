"""Optional integrations that load themselves when their package is imported.

``import lxt`` imports neither inseq nor captum.  So that ``inseq.load_model(model,
"attnlrp")`` works after ``import lxt`` (inseq finds methods as subclasses of its own
registry; it has no entry points), ``lxt.inseq`` is imported right after inseq is: at once
if inseq is already imported, else by a one-shot import hook.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_INTEGRATIONS = {"inseq": "lxt.inseq"}
_PENDING: dict = {}  # integrations whose package is not imported yet


def _load(name: str) -> None:
    try:
        importlib.import_module(_INTEGRATIONS[name])
    except Exception as e:  # an integration must never break the user's import of the package
        warnings.warn(f"lxt: {name} was imported, but lxt's {name} methods could not be registered ({e}); "
                      f"import {_INTEGRATIONS[name]} to see why.", stacklevel=3)


class _Loader(importlib.abc.Loader):
    """The package's own loader, then the integration."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self.loader  # the package keeps its own loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _load(module.__name__)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name not in _INTEGRATIONS or name in sys.modules:
            return None
        del _PENDING[name]
        if not _PENDING:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the other finders (this one skips it now)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    for name in _INTEGRATIONS:
        if name in sys.modules:
            _load(name)
        else:
            _PENDING[name] = True
    if _PENDING and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
