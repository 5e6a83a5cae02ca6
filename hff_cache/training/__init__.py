"""Training (stage two): the one loop (`loop`), its optimiser and schedule, the cached and online set-ups,
and the per-layer probe (one run per hidden state)."""
