"""Batches for the loop: from a feature cache (`from_cache`) or, for the online mode and transcription,
from audio through the encoder's input preparation (`from_audio`)."""
