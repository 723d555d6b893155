"""Alias of :mod:`lxt.modules` for code written against the published lxt
(``import lxt.explicit.modules``)."""
from lxt.modules import *  # noqa: F401,F403
from lxt.modules import __all__  # noqa: F401
