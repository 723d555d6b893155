"""lxt — Layer-wise Relevance Propagation (AttnLRP, CP-LRP) for transformers."""
from . import functional, modules, rules
from .conservation import conservation

__version__ = "0.1.0"

__all__ = ["functional", "modules", "rules", "conservation", "__version__"]
