"""The published lxt 2.1 explicit API (``lxt.explicit.functional``, ``.modules``, ``.rules``,
``.special``, ``.core``): its names, positional signatures and defaults, as thin adapters
onto the one implementation of each rule in :mod:`lxt.functional`, :mod:`lxt.rules` and
:mod:`lxt.modules`.  What differs, and what to use where the published API cannot be honoured,
is in ``docs/migration.md``.
"""
