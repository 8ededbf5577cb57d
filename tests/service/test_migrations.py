"""Schema migrations keep the rows written before them readable, and the same to clients."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from contract.jobs import JobOut
from store.db import session_scope
from store.migrate import downgrade, upgrade
from store.tables import Job

OLD_PARAMS = {
    "prompt": "a red circle",
    "steps": 2,
    "seed": 7,
    "adapters": [{"id": "adp_0123456789abcdef01234567", "scale": 0.5, "type": "lora"}],
}


def _insert_old_job(connection: sa.Connection, job_id: str, params: dict[str, Any]) -> None:
    """A job row as revision 0003 stored it: `seed` and `adapters` inside `params`."""
    connection.execute(
        sa.text(
            "INSERT INTO jobs (id, tenant_id, kind, queue, model, state, params, input_file_ids, output_file_ids, "
            "metrics, progress_step, progress_total, attempts, max_attempts, cancel_requested, webhook_attempts, "
            "created_at, publish_count, updated_at) VALUES (:id, 'ten_old', 'text-to-image', 'inference', "
            "'shapes-sd-tiny', 'succeeded', :params, '[]', '[]', '{}', 2, 2, 1, 3, 0, 0, :now, 1, :now)"
        ),
        {"id": job_id, "params": json.dumps(params), "now": datetime.now(UTC).replace(tzinfo=None)},
    )


def _stored_params(url: str, job_id: str) -> Any:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        raw = connection.execute(sa.text("SELECT params FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
    engine.dispose()
    return json.loads(raw)


def test_job_options_move_out_of_params_and_the_job_reads_the_same(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0003")
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sa.text("INSERT INTO tenants (id, name, created_at) VALUES ('ten_old', 'old', :now)"),
            {"now": datetime.now(UTC).replace(tzinfo=None)},
        )
        _insert_old_job(connection, "job_old", OLD_PARAMS)
        _insert_old_job(connection, "job_bare", {"prompt": "x"})
    engine.dispose()

    upgrade(url)
    with session_scope(url) as session:
        job = session.get(Job, "job_old")
        assert job is not None
        assert (job.seed, job.adapters, job.params) == (
            7,
            OLD_PARAMS["adapters"],
            {"prompt": "a red circle", "steps": 2},
        )
        view = JobOut.of(job)
        assert view.params == OLD_PARAMS  # clients see the job as before
        assert view.seed == 7 and [a.model_dump() for a in view.adapters] == OLD_PARAMS["adapters"]
        bare = session.get(Job, "job_bare")
        assert bare is not None and (bare.seed, bare.adapters, bare.params) == (0, [], {"prompt": "x"})
        assert JobOut.of(bare).params == {"prompt": "x", "seed": 0}

    downgrade(url, "0003")
    assert _stored_params(url, "job_old") == OLD_PARAMS
    assert _stored_params(url, "job_bare") == {"prompt": "x", "seed": 0}
