"""Benchmark: what the edge costs on its own install (issue 16's targets: ≤ 300 MB, cold classify ≤ 1 s / 250 MB).

    python -m venv /tmp/edge && /tmp/edge/bin/pip install .          # the core install: no torch
    /tmp/edge/bin/python benchmarks/edge_footprint.py --system askexpert-demo [--server URL] [--images 200]

Prints, for the interpreter that runs it: the size of its environment
(`sys.prefix`), whether torch is installed there, `askexpert classify`'s
cold start for one image (wall time and peak memory of a fresh process), and
the per-image edge latency of the generalist + router (`EdgeClient`, one image
per call, median and p99 over `--images` calls, answers kept at the edge).
Writes the figures as JSON under `DIR/report/edge_footprint.json` as well.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def tree_mb(root: Path) -> float:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total / 2**20


def cold_classify(system: Path, image: Path, server: str | None) -> tuple[float, float]:
    """(seconds, peak MiB) of a new `askexpert classify` process on one image."""
    cli = Path(sys.executable).with_name("askexpert")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(cli), "classify", "--system", str(system), str(image), "--out", f"{tmp}/r.jsonl"]
        cmd += ["--server", server] if server else []
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", type=Path, required=True)
    ap.add_argument("--server", default=None, help="expert server URL (default: the edge answers alone)")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="cold starts; the median is reported")
    args = ap.parse_args()

    from askexpert.inference.client import EdgeClient

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "photo.jpg"
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(image)
        colds = [cold_classify(args.system, image, args.server) for _ in range(args.repeats)]
    with EdgeClient.from_system(args.system) as client:
        runtime = type(client.classifier.generalist).__name__
        size = client.image_size
        frames = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
        client.classify(frames[:5])  # warm-up
        ms = []
        for frame in frames:
            start = time.perf_counter()
            client.classify(frame)
            ms.append((time.perf_counter() - start) * 1e3)
    figures = {
        "environment_mb": round(tree_mb(Path(sys.prefix)), 1),
        "torch_installed": importlib.util.find_spec("torch") is not None,
        "generalist_runtime": runtime,
        "cold_classify_s": round(float(np.median([c[0] for c in colds])), 3),
        "cold_classify_peak_mb": round(max(c[1] for c in colds), 1),
        "edge_ms_per_image_p50": round(float(np.median(ms)), 3),
        "edge_ms_per_image_p99": round(float(np.percentile(ms, 99)), 3),
        "torch_loaded_after_run": "torch" in sys.modules,
    }
    for key, value in figures.items():
        print(f"{key:28s} {value}")
    out = args.system / "report" / "edge_footprint.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
