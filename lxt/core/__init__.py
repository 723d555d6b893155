"""Composite machinery: module replacement, graph capture and rewrite, restore."""
