"""A text-corpus task: statistics over every text file under a folder.

Params: ``{"folder": ..., "pattern": "*.py", "top": 20, "output_dir": ...}``.
The job lists the files (stage ``fetch``), reads and tokenizes them in batches
off the event loop (``preprocess``), adds up the counts (``postprocess``) and
writes a JSON report (``write``), returned as ``{"report": {"href": path, ...}}``.

Lines and words are counted as ``wc -l`` and ``wc -w`` count them in a UTF-8
locale: newline characters, and runs of characters between whitespace (ASCII
whitespace and Unicode spaces, no-break spaces included, as GNU wc has it).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backgrounder import Assets, Job, NonRetryableError, RunContext, Stage

__all__ = ["CorpusTask", "FileStats", "count_words", "read_file"]

_TERM = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{2,}")
_SPACE = re.compile(
    "[ \t\n\r\x0b\x0c\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u2060\u3000]+"
)


_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")


def count_words(data: bytes) -> int:
    """Count words as ``wc -w`` does in a UTF-8 locale.

    Like wc, a run of only unprintable characters (control characters, bytes
    that are not UTF-8) is not a word.
    """
    if data.isascii() and not _CONTROL.search(data):
        return len(data.split())
    text = data.decode("utf-8", "surrogateescape")
    return sum(1 for word in _SPACE.split(text) if _has_printable(word))


def _has_printable(word: str) -> bool:
    return any(c.isprintable() and not "\udc80" <= c <= "\udcff" for c in word)


class FileStats(dict[str, Any]):
    """One file's summary: path, bytes, lines, words, terms (a Counter)."""


def read_file(path: Path, root: Path) -> FileStats | None:
    """Read one file and count it; None when it is not text (it holds NUL bytes)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    terms = Counter(m.group().lower().decode() for m in _TERM.finditer(data))
    return FileStats(
        path=str(path.relative_to(root)),
        bytes=len(data),
        lines=data.count(b"\n"),
        words=count_words(data),
        terms=terms,
    )


class CorpusTask:
    """Count files, lines, words and top terms of a folder, and write a report."""

    timeout_seconds = 1800.0
    non_retryable = (NonRetryableError,)

    def __init__(self, batch_size: int = 25, default_output_dir: str = "reports"):
        """Build the task.

        Args:
            batch_size: Files read per thread hop; cancellation is checked
                between batches.
            default_output_dir: Where reports go when params give no output_dir.
        """
        self.batch_size = batch_size
        self.default_output_dir = default_output_dir

    async def execute(self, job: Job, ctx: RunContext) -> Assets:
        """Run the four stages and return the report as an asset."""
        folder, pattern, top, output_dir = self._params(job.params)

        await ctx.progress(0, Stage.fetch, 0, 0, f"listing {pattern} in {folder}")
        # The listing thread stops early on a cancel: ctx.canceled is a plain
        # flag, safe to read from any thread.
        paths = await asyncio.to_thread(
            _list_files, folder, pattern, lambda: ctx.canceled
        )
        await ctx.progress(5, Stage.fetch, 1, 1, f"{len(paths)} files found")
        await ctx.check_canceled()

        summaries = await self._read_all(ctx, folder, paths)

        await ctx.progress(85, Stage.postprocess, 0, 1, "adding up")
        report = _aggregate(job, folder, pattern, top, summaries, len(paths))
        await ctx.progress(95, Stage.postprocess, 1, 1, "added up")
        await ctx.check_canceled()

        await ctx.progress(95, Stage.write, 0, 1, "writing the report")
        path = output_dir / f"corpus-{job.id}.json"
        await asyncio.to_thread(_write_json, path, report)
        await ctx.progress(100, Stage.write, 1, 1, f"report at {path}")
        summary = {k: report[k] for k in ("files", "lines", "words", "bytes")}
        return Assets(
            custom={
                "report": {
                    "href": str(path),
                    **summary,
                    "top_terms": report["top_terms"][:5],
                }
            }
        )

    def _params(self, params: dict[str, Any]) -> tuple[Path, str, int, Path]:
        folder = params.get("folder")
        if not isinstance(folder, str) or not folder:
            raise NonRetryableError(
                'params.folder is required: the folder to read, e.g. {"folder": '
                '"/usr/lib/python3.11"}'
            )
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise NonRetryableError(f"params.folder {folder!r} is not a folder")
        pattern = params.get("pattern", "*.py")
        if not isinstance(pattern, str) or not pattern:
            raise NonRetryableError(f"params.pattern must be a glob (got {pattern!r})")
        top = params.get("top", 20)
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 1000:
            raise NonRetryableError(f"params.top must be 1-1000 (got {top!r})")
        output = params.get("output_dir", self.default_output_dir)
        if not isinstance(output, str) or not output:
            raise NonRetryableError(f"params.output_dir must be a path ({output!r})")
        return root.resolve(), pattern, top, Path(output).expanduser().resolve()

    async def _read_all(
        self, ctx: RunContext, root: Path, paths: list[Path]
    ) -> list[FileStats]:
        """Read files in batches in a thread; report progress and honour cancels."""
        summaries: list[FileStats] = []
        total = len(paths)
        await ctx.progress(5, Stage.preprocess, 0, total, "reading")
        for start in range(0, total, self.batch_size):
            await ctx.check_canceled()
            batch = paths[start : start + self.batch_size]
            found = await asyncio.to_thread(self.read_batch, batch, root)
            summaries.extend(s for s in found if s is not None)
            done = start + len(batch)
            await ctx.progress(
                5 + 80 * done / total,
                Stage.preprocess,
                done,
                total,
                str(batch[-1].relative_to(root)),
            )
        return summaries

    def read_batch(self, batch: list[Path], root: Path) -> list[FileStats | None]:
        """Read one batch of files (runs in a worker thread)."""
        return [read_file(path, root) for path in batch]


def _list_files(root: Path, pattern: str, stop: Callable[[], bool]) -> list[Path]:
    """Return the files under ``root`` whose name matches ``pattern``, sorted."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        if stop():
            break
        dirs.sort()
        base = Path(folder)
        found.extend(base / name for name in fnmatch.filter(files, pattern))
    return sorted(p for p in found if p.is_file())


def _aggregate(
    job: Job,
    root: Path,
    pattern: str,
    top: int,
    summaries: list[FileStats],
    listed: int,
) -> dict[str, Any]:
    terms: Counter[str] = Counter()
    files = []
    for summary in summaries:
        file_terms = summary.pop("terms")
        terms.update(file_terms)
        files.append({**summary, "top_terms": _pairs(file_terms, 3)})
    return {
        "job_id": job.id,
        "folder": str(root),
        "pattern": pattern,
        "generated_at": datetime.now(UTC).isoformat(),
        "files": len(summaries),
        "skipped": listed - len(summaries),
        "lines": sum(f["lines"] for f in files),
        "words": sum(f["words"] for f in files),
        "bytes": sum(f["bytes"] for f in files),
        "top_terms": _pairs(terms, top),
        "per_file": files,
    }


def _pairs(terms: Counter[str], count: int) -> list[list[Any]]:
    """Return the ``count`` commonest terms as JSON pairs ``[term, n]``."""
    return [[term, n] for term, n in terms.most_common(count)]


def _write_json(path: Path, report: dict[str, Any]) -> None:
    os.makedirs(path.parent, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
    tmp.replace(path)
