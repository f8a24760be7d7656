"""The demo's corpus task and app, and ``backgrounder demo --once``."""

from __future__ import annotations

import asyncio
import json
import threading
from io import StringIO
from pathlib import Path
from typing import Any

from rich.console import Console
from typer.testing import CliRunner

from backgrounder import Assets, Job, RunContext, hookimpl
from backgrounder._demo import _report
from backgrounder.cli import app as cli
from backgrounder.models import JobEvent
from examples.app import create_app, create_registry
from examples.corpus import CorpusTask, FileStats
from tests.integration.test_http import API, read_events, serve, until

# Each file's text with the counts `wc -l` and `wc -w` give for it in a UTF-8
# locale (thin and no-break spaces separate words, a zero-width space does not).
FILES: dict[str, tuple[bytes, int, int]] = {
    "a.py": (b"import os\n\nprint(os.getcwd())\n", 3, 3),
    "pkg/b.py": (b"x = 1\ty  =  2\n  # words\tand\ttabs\n", 2, 10),
    "pkg/deep/c.py": (b"no trailing newline here", 0, 4),
    "pkg/deep/d.py": ("caf\u00e9 \u00fcber na\u00efve\n".encode(), 1, 3),
    "pkg/spaces.py": ("a\u2009b c\u00a0d \u2014 e\u200bf\n".encode(), 1, 6),
    "empty.py": (b"", 0, 0),
}


def make_corpus(root: Path) -> Path:
    """Write FILES under ``root``, plus files the task must not count."""
    for name, (data, _, _) in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "notes.txt").write_text("not matched by *.py\n")
    (root / "pkg" / "blob.py").write_bytes(b"binary\0data\n")
    return root


class StageRecorder:
    """A plugin that records the stages and percents of every job event."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.percents: list[float] = []

    @hookimpl
    def backgrounder_job_event(self, event: JobEvent) -> None:
        progress = event.job.progress
        if not self.stages or self.stages[-1] != progress.stage:
            self.stages.append(progress.stage)
        self.percents.append(progress.percent)


async def test_corpus_report_matches_wc_counts(tmp_path: Path) -> None:
    """The report counts files, lines and words as wc does, per file and in all."""
    folder = make_corpus(tmp_path / "corpus")
    recorder = StageRecorder()
    app = create_app(
        db_path=tmp_path / "jobs.db",
        output_dir=tmp_path / "reports",
        plugins=[recorder],
    )
    async with serve(app) as client:
        job = (
            await client.post(
                API, json={"task": "corpus", "params": {"folder": str(folder)}}
            )
        ).json()
        events = await read_events(client, job["id"])
        assets = (await client.get(f"{API}/{job['id']}/assets")).json()

    assert events[-1]["data"]["status"] == "done"
    assert recorder.stages == ["idle", "fetch", "preprocess", "postprocess", "write"]
    percents = recorder.percents
    assert percents == sorted(percents)
    assert percents[-1] == 100
    summary = assets["custom"]["report"]
    report = json.loads(Path(summary["href"]).read_text())
    assert report["files"] == summary["files"] == len(FILES)
    assert report["skipped"] == 1
    assert report["lines"] == summary["lines"] == sum(f[1] for f in FILES.values())
    assert report["words"] == summary["words"] == sum(f[2] for f in FILES.values())
    assert report["bytes"] == sum(len(f[0]) for f in FILES.values())
    per_file = {f["path"]: f for f in report["per_file"]}
    assert set(per_file) == set(FILES)
    for name, (_, lines, words) in FILES.items():
        assert (per_file[name]["lines"], per_file[name]["words"]) == (lines, words)
    assert ["trailing", 1] in report["top_terms"]


class SlowCorpus(CorpusTask):
    """A corpus task whose second batch waits until the test lets it go."""

    def __init__(self) -> None:
        super().__init__(batch_size=2, default_output_dir="unused")
        self.batches = 0
        self.proceed = threading.Event()
        self.ctx: RunContext | None = None

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        self.ctx = ctx
        return await super().execute(job, ctx)

    def read_batch(self, batch: list[Path], root: Path) -> list[FileStats | None]:
        self.batches += 1
        if self.batches == 2:
            self.proceed.wait(10)
        return super().read_batch(batch, root)


async def test_corpus_cancel_mid_run_ends_canceled_without_report(
    tmp_path: Path,
) -> None:
    """A cancel during reading ends the job canceled at the next batch."""
    folder = make_corpus(tmp_path / "corpus")
    task = SlowCorpus()
    registry = create_registry()
    registry.add("slow_corpus", task)
    app = create_app(db_path=tmp_path / "jobs.db")
    app.state.backgrounder.registry = registry
    params = {"folder": str(folder), "output_dir": str(tmp_path / "reports")}
    async with serve(app) as client:
        job = (
            await client.post(API, json={"task": "slow_corpus", "params": params})
        ).json()
        async with asyncio.timeout(10):
            while (await client.get(f"{API}/{job['id']}")).json()["progress"][
                "processed"
            ] < 2:
                await asyncio.sleep(0)
        canceled = await client.post(f"{API}/{job['id']}/cancel")
        # The runner is blocked in its second batch's thread; let it go once
        # the cancel has reached its context.
        await until(lambda: task.ctx is not None and task.ctx.canceled)
        task.proceed.set()
        events = await read_events(client, job["id"])

    assert canceled.status_code == 200
    final = events[-1]["data"]
    assert final["status"] == "canceled"
    assert final["progress"]["stage"] == "preprocess"
    assert final["progress"]["processed"] == 4
    assert final["progress"]["total"] == len(FILES) + 1
    assert task.batches == 2
    assert not (tmp_path / "reports").exists()


async def test_corpus_without_folder_fails_at_once_saying_so(tmp_path: Path) -> None:
    """Missing params.folder fails the job without retries, naming the param."""
    app = create_app(db_path=tmp_path / "jobs.db", default_max_retries=3)
    async with serve(app) as client:
        job = (await client.post(API, json={"task": "corpus", "params": {}})).json()
        events = await read_events(client, job["id"])
    final: dict[str, Any] = events[-1]["data"]
    assert final["status"] == "failed"
    assert final["attempt"] == 1
    assert "params.folder is required" in final["error"]["message"]
    assert final["error"]["retryable"] is False


def test_demo_once_serves_runs_the_job_and_prints_the_report(tmp_path: Path) -> None:
    """`backgrounder demo --once` runs a corpus job live and names its report."""
    folder = make_corpus(tmp_path / "corpus")
    result = CliRunner().invoke(
        cli,
        [
            "demo",
            "--once",
            "--port",
            "0",
            "--folder",
            str(folder),
            "--db",
            str(tmp_path / "demo.db"),
            "--reports",
            str(tmp_path / "reports"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "submitted corpus job" in result.output
    assert f"done: {len(FILES)} files" in result.output
    reports = list((tmp_path / "reports").glob("corpus-*.json"))
    assert len(reports) == 1
    assert str(reports[0]) in result.output.replace("\n", "")
    assert json.loads(reports[0].read_text())["files"] == len(FILES)


def test_demo_exit_code_says_failed_not_canceled() -> None:
    """The demo's job canceled on request (the curl line it prints) exits 0, so
    `nox -s demo` does not report a failure; a failed job exits 1 with its error."""
    out = StringIO()
    console = Console(file=out, width=200)
    assert _report({"id": "j1", "status": "canceled"}, console) == 0
    assert "job j1 canceled" in out.getvalue()
    failed = {"id": "j2", "status": "failed", "error": {"message": "no such folder"}}
    assert _report(failed, console) == 1
    assert "job j2 ended failed: no such folder" in out.getvalue()
