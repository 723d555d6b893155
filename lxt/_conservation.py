"""Where does relevance leak?  Per rule call, the relevance that went in and came out."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .rules.base import RECORDER


@dataclass
class RuleCall:
    """One backward call of a rule: ``relevance_out`` arrived at its output, ``relevance_in``
    left towards its inputs (sums, float64)."""

    label: str
    rule: str
    relevance_out: float
    relevance_in: float

    @property
    def ratio(self) -> float:
        """``relevance_in / relevance_out`` (1 for a conservative call; nan for no relevance)."""
        if self.relevance_out == 0:
            return float("nan") if self.relevance_in == 0 else float("inf")
        return self.relevance_in / self.relevance_out


class ConservationReport:
    """Relevance in and out of every rule call recorded by :func:`conservation`."""

    def __init__(self):
        self.calls: list[RuleCall] = []
        #: relevance went through a composite of the gradient engine (its rules not recorded)
        self.gradient_engine = False

    def _record(self, label, rule, relevance, rels):
        out = float(relevance.detach().sum(dtype=torch.float64))
        inn = float(sum(r.detach().sum(dtype=torch.float64) for r in rels if r is not None))
        self.calls.append(RuleCall(str(label), type(rule).__name__, out, inn))

    def leaks(self, rtol: float = 1e-3, atol: float = 1e-9) -> list[RuleCall]:
        """The calls whose input relevance differs from their output relevance by more than
        ``atol + rtol * |relevance_out|``."""
        return [c for c in self.calls
                if abs(c.relevance_in - c.relevance_out) > atol + rtol * abs(c.relevance_out)]

    def table(self, max_rows: int = 50) -> str:
        """A text table, calls in backward order."""
        rows = [f"{'call':<48} {'rule':<24} {'R out':>12} {'R in':>12} {'in/out':>8}"]
        for c in self.calls[:max_rows]:
            rows.append(f"{c.label[:48]:<48} {c.rule:<24} {c.relevance_out:>12.5g} "
                        f"{c.relevance_in:>12.5g} {c.ratio:>8.4f}")
        if len(self.calls) > max_rows:
            rows.append(f"... {len(self.calls) - max_rows} more calls")
        return "\n".join(rows)

    def __str__(self):
        return self.table()

    def __len__(self):
        return len(self.calls)


@contextlib.contextmanager
def conservation():
    """Record, for every rule call in backward, how much relevance went in and came out.

    >>> with lxt.conservation() as report:
    ...     y.backward(y)
    >>> print(report.table()); report.leaks(rtol=1e-3)
    """
    report = ConservationReport()
    RECORDER.reports.append(report)
    try:
        yield report
    finally:
        RECORDER.reports.remove(report)
        if report.gradient_engine:
            import warnings

            warnings.warn(
                "lxt.conservation: the relevance went through a composite of the gradient engine "
                "(the default), whose rules run as plain autograd and are not recorded: the report "
                f"lists only the {len(report.calls)} calls of rules without a gradient form. "
                "Register with engine='explicit' for a complete report.", UserWarning, stacklevel=3)
