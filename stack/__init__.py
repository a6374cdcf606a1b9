"""The composition root: the `flywheel` CLI, `flywheel up` and its supervisor, the worker hosting retrain and drift."""
