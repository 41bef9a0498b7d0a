"""The ingest progress display (rich) over files and records; silent when not on a terminal."""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class IngestProgress:
    def __init__(self, files: int, *, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[records]} records"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.enabled,
        )
        self.files_task: TaskID = self.progress.add_task("files", total=files, records=0)
        self.records = 0

    def __enter__(self) -> IngestProgress:
        self.progress.__enter__()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.__exit__(et, ev, tb)

    def start_file(self, path: Path) -> None:
        self.progress.update(self.files_task, description=f"{path.name[:40]}")

    def advance_record(self) -> None:
        self.records += 1
        if self.records % 50 == 0:
            self.progress.update(self.files_task, records=self.records)

    def finish_file(self) -> None:
        self.progress.update(self.files_task, advance=1, records=self.records)

    def print(self, markup: str, *, plain: str) -> None:
        if self.enabled:
            self.progress.console.print(markup)
        else:
            print(plain, file=sys.stderr)
