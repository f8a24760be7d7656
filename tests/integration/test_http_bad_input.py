"""Bad input found by trying to break the API: refused with 4xx, nothing stored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backgrounder.errors import StoreError
from backgrounder.store.sqlite import SqliteStore
from backgrounder_testing import FakeClock
from tests.integration.test_http import API, make_app, serve


@pytest.mark.parametrize(
    "field",
    [
        '"timeout_seconds": 1e999',
        '"timeout_seconds": true',
        '"timeout_seconds": "5"',
        '"max_retries": true',
        '"max_retries": "3"',
    ],
    ids=[
        "timeout-overflow",
        "timeout-bool",
        "timeout-str",
        "retries-bool",
        "retries-str",
    ],
)
async def test_http_submit_refuses_odd_numbers_and_stores_nothing(
    tmp_path: Path, field: str
) -> None:
    """Overflowing or mistyped numbers get 422 naming the field; no job is stored."""
    app, _ = make_app(tmp_path)
    async with serve(app) as client:
        response = await client.post(
            API,
            content='{"task": "noop", ' + field + "}",
            headers={"content-type": "application/json"},
        )
        listed = (await client.get(API)).json()

    assert response.status_code == 422
    assert field.split('"')[1] in response.json()["detail"]
    assert listed["items"] == []


async def test_http_list_refuses_an_overflowing_cursor(tmp_path: Path) -> None:
    """A cursor too large for the store is a 422 saying what to pass, not a 503."""
    app, _ = make_app(tmp_path)
    async with serve(app) as client:
        response = await client.get(API, params={"cursor": "9" * 25})

    assert response.status_code == 422
    assert "next_cursor" in response.json()["detail"]


async def test_sqlite_ping_reports_a_deleted_database_file(tmp_path: Path) -> None:
    """A store whose file was removed under it is reported, not silently lost."""
    store = SqliteStore(tmp_path / "jobs.db")
    await store.open(FakeClock())
    try:
        await store.ping()
        (tmp_path / "jobs.db").unlink()
        with pytest.raises(StoreError, match="file was deleted"):
            await store.ping()
    finally:
        await store.close()


def test_cli_worker_unreachable_store_is_one_line_exit_2(tmp_path: Path) -> None:
    """A worker that cannot open its store says why in one line and exits 2."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "backgrounder.cli",
            "worker",
            "examples.app:create_registry",
            "--store",
            f"sqlite:///{tmp_path}/missing/jobs.db",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ")
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
