"""hff-cache: extract a frozen speech encoder once, train hierarchical feature fusion from the cache."""

__version__ = "0.1.0"
