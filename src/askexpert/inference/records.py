"""Where `askexpert classify` puts its records, how it sums them up, and how it watches a folder.

Records are written as they come (JSONL or CSV by the file's suffix, flushed per
record), so an interrupted run keeps everything it classified. The records file
is also the ledger: reopened, it keeps its records (`done` holds their paths, so
a restarted run skips them) and drops a last line torn by a kill, whose file is
then classified again; every file ends up recorded exactly once. The watcher
polls: no extra dependency, and it works on network shares where file events do not.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from askexpert.errors import ConfigError
from askexpert.inference.client import IMAGE_SUFFIXES, RECORD_FIELDS


class RecordWriter:
    """Append records to `path`; `fresh=True` starts it over, otherwise what it holds counts as done."""

    def __init__(self, path: str | Path, fresh: bool = False) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in (".jsonl", ".csv"):
            raise ConfigError(f"{self.path}: records go to a .jsonl or .csv file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        is_csv = self.path.suffix.lower() == ".csv"
        self.done: set[str] = set() if fresh else _recorded_paths(self.path, is_csv)
        if fresh:
            self.path.unlink(missing_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.fh: IO[str] = self.path.open("a", newline="")
        self.csv = csv.DictWriter(self.fh, fieldnames=list(RECORD_FIELDS)) if is_csv else None
        if self.csv is not None and new:
            self.csv.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        self.done.add(str(record.get("path")))
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


def _recorded_paths(path: Path, is_csv: bool) -> set[str]:
    """The paths an existing records file holds, after cutting a last line torn by a kill."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # a torn last record: its file will be classified again
        path.write_bytes(data)
    text = data.decode("utf-8", errors="replace")
    if is_csv:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        if rows and {"path", "label", "source"} - set(rows[0]):
            raise ConfigError(f"{path}: not an askexpert records file (columns {sorted(rows[0])}); use --fresh")
        return {row["path"] for row in rows}
    done = set()
    for number, line in enumerate(text.splitlines(), 1):
        try:
            done.add(str(json.loads(line)["path"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: not an askexpert record; use --fresh to start the file over") from None
    return done


class Tally:
    """The run's summary, one row per outcome (edge, expert, fallback, bad file) plus `all`.

    Kept as it goes, so a watch that runs for days holds a few numbers per record, not the records.
    Accuracy is over the records whose truth is known (a data split); blank otherwise.
    """

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {}
        self.right: dict[str, int] = {}
        self.judged: dict[str, int] = {}
        self.sent: dict[str, float] = {}

    def add(self, record: dict[str, Any]) -> None:
        for key in ("all", "bad file" if record.get("error") else str(record["source"])):
            self.latency.setdefault(key, []).append(float(record.get("latency_ms") or 0.0))
            self.sent[key] = self.sent.get(key, 0.0) + float(record.get("bytes_sent") or 0.0)
            if record.get("truth") is not None and not record.get("error"):
                self.judged[key] = self.judged.get(key, 0) + 1
                self.right[key] = self.right.get(key, 0) + int(record["label"] == record["truth"])

    def rows(self) -> list[dict[str, Any]]:
        order = ["all", "edge", "expert", "fallback", "bad file"]
        rows = []
        for key in sorted(self.latency, key=lambda k: order.index(k) if k in order else len(order)):
            lat = np.asarray(self.latency[key])
            judged = self.judged.get(key, 0)
            rows.append(
                {
                    "outcome": key,
                    "files": len(lat),
                    "accuracy": self.right.get(key, 0) / judged if judged else None,
                    "mean_ms": float(lat.mean()),
                    "p99_ms": float(np.percentile(lat, 99)),
                    "bytes_sent": self.sent[key],
                }
            )
        return rows


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
            yield ready
            last_new = time.monotonic()  # idle counts from when the batch was handled, not from when it was found
        elif idle_exit_s is not None and time.monotonic() - last_new > idle_exit_s:
            return
        time.sleep(poll_s)
