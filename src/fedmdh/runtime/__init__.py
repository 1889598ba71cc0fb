"""Runtimes that drive the algorithms: the in-process simulator (and later real engines)."""
