"""Where `askexpert classify` puts its records, and how it watches a folder.

Records are written as they come (JSONL or CSV by the file's suffix, flushed per
record), so an interrupted run keeps everything it classified. The watcher polls:
no extra dependency, and it works on network shares where file events do not.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from askexpert.errors import ConfigError
from askexpert.inference.client import IMAGE_SUFFIXES, RECORD_FIELDS


class RecordWriter:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in (".jsonl", ".csv"):
            raise ConfigError(f"{self.path}: records go to a .jsonl or .csv file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh: IO[str] = self.path.open("w", newline="")
        self.csv = csv.DictWriter(self.fh, fieldnames=list(RECORD_FIELDS)) if self.path.suffix == ".csv" else None
        if self.csv is not None:
            self.csv.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        if self.csv is not None:
            self.csv.writerow({k: record.get(k) for k in RECORD_FIELDS})
        else:
            self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def watch_folder(folder: str | Path, poll_s: float = 0.5, idle_exit_s: float | None = None) -> Iterator[list[Path]]:
    """Yield batches of new image files under `folder` as they appear (each file once).

    A file is taken once its size stayed the same over one poll, so a camera still
    writing it is not read half-way. Stops after `idle_exit_s` without a new file
    (None: runs until interrupted).
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder to watch")
    seen: set[Path] = set()
    sizes: dict[Path, int] = {}
    last_new = time.monotonic()
    while True:
        ready = []
        for path in sorted(root.rglob("*")):
            if path in seen or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            size = path.stat().st_size
            if sizes.get(path) == size:
                ready.append(path)
                seen.add(path)
            sizes[path] = size
        if ready:
            last_new = time.monotonic()
            yield ready
        elif idle_exit_s is not None and time.monotonic() - last_new > idle_exit_s:
            return
        time.sleep(poll_s)
