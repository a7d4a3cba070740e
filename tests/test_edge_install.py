"""The edge installs and runs without the training stack: `classify` against a server with torch blocked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from askexpert.partition import Partition

# What the core install leaves out: importing any of these on the edge path fails the run below.
TRAINING_STACK = ["torch", "torchvision", "timm", "safetensors", "sklearn", "scipy", "matplotlib", "onnx", "fastapi",
                  "uvicorn", "starlette", "prometheus_client", "ray"]  # fmt: skip

EDGE_RUN = textwrap.dedent(
    """
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)  # as a package never installed
            return None

    sys.meta_path.insert(0, Blocker())
    from askexpert.cli import main

    args = sys.argv[2:]
    try:
        main(args)
    except SystemExit as exc:
        print("exit", exc.code)
    try:
        main([*args, "--runtime", "torch"])
    except SystemExit as exc:
        print("torch runtime exit", exc.code)
    for command in (["train", "generalist"], ["serve"], ["classify", "--split", "test"]):  # the stacks left out
        try:
            main([*command, "--system", args[args.index("--system") + 1]])
        except SystemExit as exc:
            print(command[0], "exit", exc.code)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("loaded:", ",".join(loaded) or "none")
    """
)


def _edge_copy(trained_system: Path, root: Path) -> Path:
    """Only what an edge device holds: config, partition, the generalist's metadata and its ONNX export."""
    root.mkdir()
    for name in ("config.yaml", "partition.json", "generalist.json", "generalist.onnx", "generalist.onnx.json"):
        shutil.copy(trained_system / name, root / name)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["routing"].update(gate="max_prob", tau=1.0)  # every sample asks its expert
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_classify_runs_with_torch_blocked(server, trained_system: Path, tmp_path: Path) -> None:
    edge = _edge_copy(trained_system, tmp_path / "edge")
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(images / f"p{i}.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "records.jsonl"
    args = ["classify", "--system", str(edge), str(images), "--server", server.url, "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-c", EDGE_RUN, ",".join(TRAINING_STACK), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "exit" not in run.stdout.split("torch runtime exit")[0], run.stdout + run.stderr  # the run itself: exit 0
    assert "torch runtime exit 2" in run.stdout, run.stdout + run.stderr
    assert "torch runtime needs the training stack" in run.stderr and "askexpert[train]" in run.stderr
    assert "train exit 2" in run.stdout and "serve exit 2" in run.stdout and "classify exit 2" in run.stdout
    assert "is not installed: this command needs pip install 'askexpert[train]'" in run.stderr
    assert "is not installed: this command needs pip install 'askexpert[serve]'" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert "loaded: none" in run.stdout, run.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 7
    bad = [r for r in records if r["error"]]
    assert [Path(r["path"]).name for r in bad] == ["broken.jpg"]
    part = Partition.from_json(edge / "partition.json")
    for rec in (r for r in records if not r["error"]):
        assert rec["source"] == "expert", rec  # answered by the server's expert, over HTTP
        assert rec["label"] in part.subsets[part.expert_ids.index(rec["expert"])]
