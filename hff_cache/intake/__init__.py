"""Intake: audio files and corpora in, `Utterance` records out.

`audio` reads and resamples one file, `manifests` turns a manifest, a LibriSpeech folder, an audio folder or a
saved dataset into utterances, `selection` cuts splits of them, `synth` speaks the demo's corpus."""
