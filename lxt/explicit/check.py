"""Published ``lxt.explicit.check`` (``conservation_check``): replaced by :func:`lxt.conservation`."""
raise ImportError(
    "lxt: lxt.explicit.check.conservation_check is gone; use `with lxt.conservation() as "
    "report:` and report.table() / report.leaks() (see docs/migration.md)."
)
