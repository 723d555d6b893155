"""Published ``lxt.efficient`` (``monkey_patch``): replaced by :mod:`lxt.composites`."""
raise ImportError(
    "lxt: lxt.efficient.monkey_patch patched transformers classes for the whole process; use "
    "`with lxt.composites.attnlrp(model).context(model):` (this model only, restored on exit; "
    "see docs/migration.md)."
)
