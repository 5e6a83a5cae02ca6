"""One file per fusion kind; `hff_cache.model.fusion.FUSIONS` registers them."""
