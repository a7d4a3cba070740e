"""EdgeClient: classify real images (files, folders, arrays) with a system, from Python or `askexpert classify`.

```python
from askexpert.inference.client import EdgeClient

with EdgeClient.from_system("askexpert-demo", server="http://127.0.0.1:8000") as client:
    for record in client.classify(["photos/cat.jpg", "photos/"]):
        print(record["path"], record["class_name"], record["source"], record["confidence"])
```
Any size and format Pillow reads is converted to RGB and resized to the size the
system's data source yields. A file that cannot be read gets a record with
`error` naming it; the others go on. Without a server the edge runs alone
(samples it would have offloaded keep the generalist's label, `source: fallback`,
`reason: edge-only: ...`), or with `local_experts=True` asks the system's own
expert checkpoints in this process. `classify_split` runs the same path over a
data split of the system (records carry `truth`): `askexpert classify --split test`.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from askexpert.data import LabeledImages, input_size
from askexpert.data.folder import load_image
from askexpert.errors import ConfigError
from askexpert.inference.collaborative import CollaborativeClassifier
from askexpert.inference.edge import connect, edge_classifier
from askexpert.inference.http_backend import HttpExpertBackend
from askexpert.protocol.backend import BackendError, ExpertBackend, RefusingBackend
from askexpert.system import SystemDir

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
# One record schema for every classification (files, arrays, a data split; JSONL or CSV):
# what was classified and the answer, then the edge's times, then what the expert call measured
# (None where no expert was asked). `truth` is known for a data split only.
RECORD_FIELDS = (
    "path", "label", "class_name", "confidence", "source", "expert", "reason", "truth", "generalist_label",
    "latency_ms", "edge_ms", "edge_ms_modelled", "error",
    "bytes_sent", "bytes_received", "encode_ms", "rtt_ms", "queue_ms", "compute_ms", "batch_size", "retries",
    "server_energy_j",
)  # fmt: skip


def expand_paths(items: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, folders recursively (image suffixes, sorted), glob patterns expanded.

    A path that names nothing is passed on as is, so it gets an error record instead of vanishing.
    """
    for item in items:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists() or not glob.has_magic(text):
            yield path
        else:
            for match in sorted(glob.glob(str(path), recursive=True)):
                m = Path(match)
                yield from expand_paths([m]) if m.is_dir() else [m]


class EdgeClient:
    """A system's edge (generalist + router + expert backend) behind `classify(paths or images)`."""

    def __init__(
        self,
        classifier: CollaborativeClassifier,
        class_names: Sequence[str],
        image_size: int,
        closer: HttpExpertBackend | None = None,
        batch_size: int = 64,
        edge_slowdown: float | None = None,
    ) -> None:
        """`edge_slowdown`: a device profile's factor; records then carry `edge_ms_modelled` (a model, not a timing)."""
        self.classifier = classifier
        self.class_names = list(class_names)
        self.image_size = image_size
        self.batch_size = batch_size
        self.edge_slowdown = edge_slowdown
        self._closer = closer

    @classmethod
    def from_system(
        cls,
        system_dir: str | Path | SystemDir,
        server: str | None = None,
        token: str | None = None,
        on_mismatch: str = "fail",
        local_experts: bool = False,
        runtime: str = "auto",
        threads: int = 0,
        ca_file: str | Path | None = None,
        edge_slowdown: float | None = None,
    ) -> EdgeClient:
        """Open a trained system; `server` checks the handshake first (see `edge.connect`)."""
        system = SystemDir.of(system_dir)
        cfg = system.config()
        if server and local_experts:
            raise ConfigError("give either a server or local_experts, not both")
        closer: HttpExpertBackend | None = None
        backend: ExpertBackend
        if server:
            backend, closer = connect(system, server, token, on_mismatch, ca_file)
        elif local_experts:
            try:
                from askexpert.models.local_experts import LocalExpertBackend
            except ImportError as exc:
                raise ConfigError(
                    f"local experts run in torch ({exc.name} is not installed): pip install 'askexpert[train]', "
                    "or ask a server (--server)"
                ) from None
            backend = LocalExpertBackend.of_system(system)
        else:
            backend = RefusingBackend(_NoServer("no expert server given: the edge answers alone"))
        classifier = edge_classifier(system, backend, runtime=runtime, threads=threads)
        names = system.generalist_meta().extra.get("class_names") or [
            str(c) for c in range(classifier.partition.num_classes)
        ]
        return cls(classifier, names, input_size(cfg.data), closer, cfg.serving.client_batch_size, edge_slowdown)

    def close(self) -> None:
        if self._closer is not None:
            self._closer.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def classify(self, items: Iterable[str | Path | np.ndarray] | np.ndarray) -> list[dict[str, Any]]:
        """Records for image files, folders, globs, or uint8 arrays (H×W×3 or N×H×W×3).

        Order: the arrays first (as given), then the files in the order given (folders sorted within).
        """
        return list(self.iter_classify(items))

    def iter_classify(self, items: Iterable[str | Path | np.ndarray] | np.ndarray) -> Iterator[dict[str, Any]]:
        """Like `classify`, yielding each batch's records as soon as they are ready."""
        batch: list[tuple[str, np.ndarray | None, str]] = []
        for name, image, error in self._decoded(items):
            batch.append((name, image, error))
            if len(batch) >= self.batch_size:
                yield from self._run(batch)
                batch = []
        if batch:
            yield from self._run(batch)

    def classify_split(
        self, data: LabeledImages, name: str = "test", skip: Iterable[str] = ()
    ) -> Iterator[dict[str, Any]]:
        """Records for a data split (`path`: `<name>[i]`, `truth`: its label), skipping the paths in `skip`."""
        if data.images.shape[1:3] != (self.image_size, self.image_size):
            raise ConfigError(f"{name} images are {data.images.shape[1:3]}, this edge sends {self.image_size}")
        done = set(skip)
        todo = [i for i in range(len(data)) if f"{name}[{i}]" not in done]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            batch = [(f"{name}[{i}]", data.images[i], "") for i in chunk]
            for i, record in zip(chunk, self._run(batch), strict=True):
                yield record | {"truth": int(data.labels[i])}

    def _decoded(self, items: Iterable[str | Path | np.ndarray] | np.ndarray) -> Iterator[tuple[str, Any, str]]:
        if isinstance(items, np.ndarray):
            items = [items] if items.ndim == 3 else list(items)
        arrays: list[np.ndarray] = []
        paths: list[str | Path] = []
        for item in items:
            (arrays if isinstance(item, np.ndarray) else paths).append(item)  # type: ignore[arg-type]
        for i, array in enumerate(arrays):
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                yield f"array[{i}]", None, f"array[{i}]: expected uint8 (H, W, 3), got {array.dtype} {array.shape}"
                continue
            image = Image.fromarray(array).resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            yield f"array[{i}]", np.asarray(image, dtype=np.uint8), ""
        for path in expand_paths(paths):
            try:
                yield str(path), load_image(path, self.image_size), ""
            except OSError as exc:
                yield str(path), None, str(exc)

    def _run(self, batch: list[tuple[str, np.ndarray | None, str]]) -> Iterator[dict[str, Any]]:
        good = [i for i, (_, image, _) in enumerate(batch) if image is not None]
        records: dict[int, dict[str, Any]] = {}
        if good:
            images = np.stack([batch[i][1] for i in good])  # type: ignore[misc]
            start = time.perf_counter()
            pred = self.classifier(images)
            per_image_ms = (time.perf_counter() - start) * 1e3 / len(good)
            edge_ms = pred.edge_ms / len(good)
            for j, i in enumerate(good):
                row = pred.record(j)  # the answer, its source and what its expert call measured
                topk, expert_conf = row.pop("topk"), row.pop("expert_confidence")
                label = row["label"]
                records[i] = (
                    _BLANK
                    | {"bytes_sent": 0.0}
                    | row
                    | {
                        "path": batch[i][0],
                        "class_name": self.class_names[label] if 0 <= label < len(self.class_names) else str(label),
                        "confidence": expert_conf if row["source"] == "expert" else topk[0][1],
                        "latency_ms": per_image_ms,
                        "edge_ms": edge_ms,
                        "edge_ms_modelled": edge_ms * self.edge_slowdown if self.edge_slowdown is not None else None,
                    }
                )
        for i, (name, _image, error) in enumerate(batch):
            yield records.get(i) or _BLANK | {"path": name, "error": error}


_BLANK: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)


class _NoServer(BackendError):
    reason = "edge-only"
