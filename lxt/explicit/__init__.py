"""Compatibility aliases for the published lxt import paths (``lxt.explicit.*``)."""
