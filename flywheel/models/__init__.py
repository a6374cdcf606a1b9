"""Every table of the Flywheel database, as SQLModel entity families (``XBase``, ``XCreate``, ``X``, ``XPublic``).

Packages meet through these models: ``feedback`` writes predictions and labels, ``retrain`` reads accepted labels
and records runs, ``monitoring`` reads windows and writes reports. Importing this package registers every table
on ``SQLModel.metadata`` (Alembic autogenerate compares against it).
"""

from flywheel.models import access, deployment, desk, drift, feedback, labels, retrain, schedule

__all__ = ["access", "deployment", "desk", "drift", "feedback", "labels", "retrain", "schedule"]
