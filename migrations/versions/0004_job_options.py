"""jobs.seed, jobs.adapters: the job's own options, out of the method's params

Revision ID: 0004
Revises: 0003

Rows written before carried `seed` and `adapters` inside `params`; they are moved into the new columns, so
every row reads the same way.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPTIONS = ("seed", "adapters")
jobs = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("params", sa.JSON),
    sa.column("seed", sa.Integer),
    sa.column("adapters", sa.JSON),
)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("seed", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("adapters", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
    bind = op.get_bind()
    for job_id, params in bind.execute(sa.select(jobs.c.id, jobs.c.params)).all():
        if not isinstance(params, dict) or not any(key in params for key in OPTIONS):
            continue
        bind.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(
                params={key: value for key, value in params.items() if key not in OPTIONS},
                seed=int(params.get("seed") or 0),
                adapters=list(params.get("adapters") or []),
            )
        )


def downgrade() -> None:
    bind = op.get_bind()
    for job_id, params, seed, adapters in bind.execute(
        sa.select(jobs.c.id, jobs.c.params, jobs.c.seed, jobs.c.adapters)
    ).all():
        folded = {**(params or {}), "seed": seed, **({"adapters": adapters} if adapters else {})}
        bind.execute(jobs.update().where(jobs.c.id == job_id).values(params=folded))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("adapters")
        batch_op.drop_column("seed")
