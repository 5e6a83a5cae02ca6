"""Extraction (stage one): run a frozen encoder once over the intake and write the feature cache."""
