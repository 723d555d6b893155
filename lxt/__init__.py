"""lxt — Layer-wise Relevance Propagation (AttnLRP, CP-LRP) for transformers."""
from . import composites, functional, modules, rules
from ._conservation import conservation  # the function is lxt.conservation (no module of that name hides it)
from .core.composite import Composite, LayerMap
from .explain import Explanation, explain

__version__ = "0.1.0"

from . import _after_import

_after_import.install()  # lxt.inseq once inseq is imported (import lxt imports neither)
del _after_import

__all__ = ["Composite", "LayerMap", "explain", "Explanation", "composites", "functional", "modules", "rules", "conservation", "__version__"]
