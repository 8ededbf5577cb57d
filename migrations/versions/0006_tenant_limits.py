"""tenants.limits (per-tenant quota overrides); an index for counting a tenant's jobs by state

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("limits", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_tenant_state", "jobs", ["tenant_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_state", table_name="jobs")
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("limits")
