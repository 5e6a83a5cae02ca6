"""Runtime: where and how the process runs (torchrun ranks, devices, versions) and small torch helpers
every layer shares. Imports nothing else from the package."""
