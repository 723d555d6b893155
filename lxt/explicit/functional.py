"""Alias of :mod:`lxt.functional` for code written against the published lxt
(``import lxt.explicit.functional``)."""
from lxt.functional import *  # noqa: F401,F403
from lxt.functional import __all__  # noqa: F401
