"""Alias of :mod:`lxt.rules` for code written against the published lxt
(``import lxt.explicit.rules``)."""
from lxt.rules import *  # noqa: F401,F403
from lxt.rules import __all__  # noqa: F401
