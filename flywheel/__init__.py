"""Flywheel: a model-serving microservice with a continuous data feedback loop."""

__version__ = "0.1.0"
