"""Run directories: the run document (document.py); its files, checkpoints, commit points and lock
(directory.py); the one run loader (loading.py); ``verify RUN`` (verify.py); TensorBoard scalars
(tensorboard.py); plots (plots.py)."""
