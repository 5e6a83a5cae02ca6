"""Tasks: which utterances are labelled and how (ASR characters, phones, classes), label files, tokenizers."""
