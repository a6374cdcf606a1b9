"""Errors of drift monitoring."""

from __future__ import annotations

from flywheel.errors import FlywheelError


class MonitoringError(FlywheelError):
    """A drift report cannot be produced or served."""
