"""Composite machinery: module replacement, calls rewritten while the model runs, restore."""
