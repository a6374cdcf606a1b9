"""Typed errors whose messages tell the user what to do; the CLI prints them on one line."""

from __future__ import annotations


class FlywheelError(Exception):
    """Base class of errors a user can act on."""


class DatasetError(FlywheelError):
    """A training or evaluation file cannot be used."""


class RegistryError(FlywheelError):
    """A model version or the champion pointer is missing or invalid."""


class TrainingError(FlywheelError):
    """Training could not start or finish."""
