"""The published lxt 2.1 ``Composite`` (``lxt.explicit.core``), as an adapter onto
:class:`lxt.Composite`.

The published composite replaced modules by rules and, for function entries
(``{operator.add: lf.add2}``), traced the model with ``transformers.utils.fx.HFTracer``,
which transformers 5 removed.  This adapter honours module entries (``{nn.Linear:
rules.EpsilonRule, nn.LayerNorm: lm.LayerNormEpsilon}``) through :class:`lxt.Composite`
(explicit engine, no tracing) and restores the model exactly on :meth:`Composite.remove`;
function entries, ``dummy_inputs``, canonizers and zennit composites raise one line naming
what to use instead: ``lxt.composites.attnlrp(model)`` or :class:`lxt.Composite`, whose
rewrites functional calls while the model runs.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Optional

from torch import nn

from ..core.composite import Composite as _Composite

__all__ = ["Composite"]

_USE_INSTEAD = ("use lxt.composites.attnlrp(model) (Llama, Mistral, Qwen2, BERT, ViT) or "
                "lxt.Composite, which rewrites functional calls while the model runs and takes "
                "lxt.functional rules (torch signatures)")


class Composite:
    """Published ``Composite(layer_map)``: module types mapped to rules or lxt modules.

    Parameters
    ----------
    layer_map : dict
        ``{nn.Module subclass: rule class (lxt.explicit.rules) or lxt module class
        (lxt.explicit.modules)}``.  Function keys (published: traced with
        ``transformers.utils.fx``) and name strings raise with what to use instead.
    canonizers, zennit_composite
        Not supported (must be empty).

    Examples
    --------
    >>> Composite({nn.Linear: rules.EpsilonRule}).register(model)
    """

    def __init__(self, layer_map: Mapping, canonizers=(), zennit_composite=None):
        if not isinstance(layer_map, Mapping):
            raise TypeError(f"lxt: Composite takes a dict layer map, got {type(layer_map).__name__}.")
        for key in layer_map:
            if isinstance(key, str):
                raise TypeError(f"lxt: layer map key {key!r}: name keys are not supported; use "
                                "lxt.Composite(overrides={'qualified.name*': {...}}).")
            if not (isinstance(key, type) and issubclass(key, nn.Module)):
                raise NotImplementedError(
                    f"lxt: layer map key {getattr(key, '__name__', key)!r} is a function, which "
                    f"the published Composite traced with transformers.utils.fx (removed in "
                    f"transformers 5); {_USE_INSTEAD}.")
        if canonizers or zennit_composite is not None:
            raise NotImplementedError(
                f"lxt: canonizers and zennit composites are not supported; {_USE_INSTEAD}.")
        self.layer_map = dict(layer_map)
        self._composite: Optional[_Composite] = None

    def register(self, parent: nn.Module, dummy_inputs: Optional[dict] = None, tracer=None,
                 verbose: bool = False, no_grad: bool = True) -> nn.Module:
        """Replace the mapped modules of ``parent`` (in place) and return ``parent``.

        ``no_grad=True`` freezes the parameters while registered (restored by :meth:`remove`).
        ``dummy_inputs`` / ``tracer`` (graph tracing) raise.
        """
        if dummy_inputs is not None or tracer is not None:
            raise NotImplementedError(
                "lxt: Composite.register(dummy_inputs=..., tracer=...) traced with "
                f"transformers.utils.fx, which transformers 5 removed; {_USE_INSTEAD}.")
        self.remove()
        comp = _Composite(self.layer_map, trace=False, freeze_parameters=no_grad,
                          engine="explicit", name="lxt.explicit.core.Composite")
        comp.register(parent)
        self._composite = comp
        if verbose:
            self.print_summary()
        return parent

    def remove(self) -> None:
        """Put every replaced module back (the same objects) and restore parameter flags."""
        if self._composite is not None:
            self._composite.remove()
            self._composite = None

    @contextlib.contextmanager
    def context(self, module: nn.Module, verbose: bool = False):
        """``with composite.context(model) as m:`` registers, and restores on exit."""
        self.register(module, verbose=verbose)
        try:
            yield module
        finally:
            self.remove()

    def print_summary(self) -> None:
        """Print which modules got which rule."""
        if self._composite is None:
            print("lxt.explicit.core.Composite (not registered)")
        else:
            print(self._composite.summary())
