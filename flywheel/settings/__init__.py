"""Every Flywheel option, read from the environment under the prefix ``FLYWHEEL_``, one class per concern.

A package that needs one concern can be typed to that class (``CoreSettings`` for the database and the
publisher, ``DriftSettings`` for monitoring, ...); each is constructible from the environment on its own.
``Settings`` has them all; the composition root builds it once and hands it to every component.
"""

from __future__ import annotations

from flywheel.settings.access import AccessSettings
from flywheel.settings.core import CoreSettings
from flywheel.settings.drift import DriftSettings
from flywheel.settings.feedback import FeedbackSettings
from flywheel.settings.retrain import RetrainSettings
from flywheel.settings.serving import ServingSettings
from flywheel.settings.training import DEFAULT_BASE_MODEL, TrainingSettings

__all__ = [
    "DEFAULT_BASE_MODEL",
    "AccessSettings",
    "CoreSettings",
    "DriftSettings",
    "FeedbackSettings",
    "RetrainSettings",
    "ServingSettings",
    "Settings",
    "TrainingSettings",
]


class Settings(
    CoreSettings,
    TrainingSettings,
    ServingSettings,
    FeedbackSettings,
    AccessSettings,
    RetrainSettings,
    DriftSettings,
):
    """Flywheel configuration, all concerns; each field maps to ``FLYWHEEL_<NAME>``."""
