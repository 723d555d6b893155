"""The execution form of rule calls: which engine (explicit LRP or its gradient form) and the
stabiliser epsilon of the gradient form's divisions.  One thread-local value, :data:`ENGINE`,
set by whoever runs rule calls for a composite (``lxt.rules.base.bind_engine`` around a
rewritten call, :class:`lxt.rules.base.LxtModule` around a module rule, the dispatcher of
``lxt.core.dispatch`` around a registered forward) and read by the rules
(``lxt.rules.base``).  A leaf module: it imports nothing of lxt.
"""
from __future__ import annotations

import threading

#: Default stabiliser of the epsilon family (linear, add, matmul, mean, layer norm, attention).
#: Small enough to leave float32 relevance unchanged to round-off, large enough to keep
#: ``R / z`` finite where an output is exactly zero.
EPSILON = 1e-6


class _Engine(threading.local):
    """Which form rule calls take on this thread: explicit (default) or gradient, and the
    stabiliser of the gradient form's divisions."""

    gradient = False
    epsilon = EPSILON

    def set(self, gradient: bool, epsilon: float) -> tuple:
        """Switch to ``(gradient, epsilon)``; returns the previous form for :meth:`restore`."""
        previous = self.gradient, self.epsilon
        self.gradient, self.epsilon = gradient, epsilon
        return previous

    def restore(self, previous: tuple) -> None:
        self.gradient, self.epsilon = previous


#: Thread-local engine switch; outside a composite every rule is explicit.
ENGINE = _Engine()
