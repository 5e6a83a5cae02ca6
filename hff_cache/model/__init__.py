"""The trainable model: fusion of hidden states (`fusion`, one kind per file in `fusions/`), task heads,
SpecAugment, the online methods' adapters, and `HFFModel` that joins them. It reads a `Batch`, never a cache."""
