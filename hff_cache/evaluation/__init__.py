"""Evaluation: metrics, decoding a run on a cache (`evaluate`), transcription of new audio, summary tables.
Training validates through it; it loads runs through `hff_cache.runs`."""
