"""The retrain worker's persistent schedule: APScheduler's job table, created by a migration like every other.

APScheduler's ``SQLAlchemyJobStore`` creates its table when it finds none. Two workers started together on a new
PostgreSQL database (``docker compose up --scale worker=2``) both did, and one died on the duplicate (a unique
violation in ``pg_type``). Declared here, Alembic creates it once, before any worker starts, and the job store
finds it. Not an entity family: the columns are APScheduler's and only its job store reads or writes them.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import SQLModel

#: The job store's table name (``SQLAlchemyJobStore(tablename=...)``).
JOBS_TABLE = "apscheduler_jobs"

#: Column for column what APScheduler 3's ``apscheduler.jobstores.sqlalchemy.SQLAlchemyJobStore`` defines.
scheduler_jobs = sa.Table(
    JOBS_TABLE,
    SQLModel.metadata,
    sa.Column("id", sa.Unicode(191), primary_key=True),
    sa.Column("next_run_time", sa.Float(25), index=True),
    sa.Column("job_state", sa.LargeBinary, nullable=False),
)
