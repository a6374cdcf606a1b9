"""The Flywheel database: engine and sessions, the background opener, column types, the migration tree."""

from flywheel.database.background import BackgroundDatabase
from flywheel.database.engine import Database, DatabaseError, normalize_url
from flywheel.database.types import UTCDateTime

__all__ = ["BackgroundDatabase", "Database", "DatabaseError", "UTCDateTime", "normalize_url"]
