"""`askexpert classify` and EdgeClient on image files: every file gets a record, bad ones named."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from askexpert.data import load_splits
from askexpert.inference.client import RECORD_FIELDS, EdgeClient, expand_paths
from askexpert.system import SystemDir
from conftest import ServerProcess


def _photos(trained_system: Path, folder: Path, n: int = 12) -> tuple[list[Path], np.ndarray]:
    """Test images written as JPEG and PNG files of other sizes, in nested folders."""
    test = load_splits(SystemDir.open(trained_system).config().data, trained_system).test
    paths = []
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"img{i:02d}.jpg" if i % 2 else f"img{i:02d}.png")
        Image.fromarray(test.images[i]).resize((48 + i, 40)).save(path)
        paths.append(path)
    return paths, test.labels[:n]


def test_cli_classifies_a_folder_with_corrupt_files(trained_system: Path, tmp_path: Path, capsys) -> None:
    from askexpert.cli import main

    photos, _ = _photos(trained_system, tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "photos" / "empty.png").write_bytes(b"")
    (tmp_path / "photos" / "notes.txt").write_text("not an image, not picked up from a folder")
    out = tmp_path / "records.jsonl"
    main(["classify", "--system", str(trained_system), str(tmp_path / "photos"), str(tmp_path / "missing.jpg"),
          "--out", str(out)])  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_path = {Path(r["path"]).name: r for r in records}
    assert len(records) == len(photos) + 3  # 12 images, 2 corrupt, 1 missing; the .txt is not an image
    for name in ("broken.jpg", "empty.png", "missing.jpg"):
        assert by_path[name]["error"] and name in by_path[name]["error"] and by_path[name]["label"] is None
    good = [r for r in records if not r["error"]]
    assert len(good) == len(photos)
    names = json.loads((trained_system / "generalist.json").read_text())["extra"]["class_names"]
    for r in good:
        assert r["class_name"] == names[r["label"]] and 0 <= r["confidence"] <= 1
        assert r["source"] in ("edge", "fallback") and r["latency_ms"] > 0
        assert r["source"] == "edge" or r["reason"].startswith("edge-only")
    text = capsys.readouterr().out
    assert "bad file" in text


def test_client_with_a_server_and_csv_stdin_and_glob(
    server: ServerProcess, trained_system: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from askexpert.cli import main

    photos, labels = _photos(trained_system, tmp_path / "p")
    with EdgeClient.from_system(trained_system, server=server.url) as client:
        router = client.classifier.router
        client.classifier.router = router.at(router.point.updated(gate="max_prob", tau=1.0))  # all to the experts
        records = client.classify([str(p) for p in photos])
        assert [r["path"] for r in records] == [str(p) for p in photos]
        assert {r["source"] for r in records} <= {"expert", "fallback"} and "expert" in {r["source"] for r in records}
        arrays = client.classify(np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in photos]))
        assert len(arrays) == len(photos) and arrays[0]["path"] == "array[0]"
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(str(p) for p in photos[:3]) + "\n"))
    out = tmp_path / "r.csv"
    main(["classify", "--system", str(trained_system), "--server", server.url, "--stdin",
          str(tmp_path / "p" / "a" / "*.jpg"), "--out", str(out)])  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    jpgs = sorted((tmp_path / "p" / "a").glob("*.jpg"))
    assert len(rows) == len(jpgs) + 3
    assert list(rows[0]) == list(RECORD_FIELDS)  # the one schema, whatever was classified
    assert {"path", "label", "class_name", "confidence", "source", "truth", "latency_ms", "rtt_ms", "error"} <= set(
        rows[0]
    )
    asked = [r for r in rows if r["source"] == "expert"]
    assert all(float(r["rtt_ms"]) > 0 and float(r["bytes_sent"]) >= 3072 for r in asked)
    assert all(r["truth"] == "" for r in rows)  # user files: no truth known


def test_watched_folder_classifies_files_as_they_appear(trained_system: Path, tmp_path: Path) -> None:
    from askexpert.cli import main

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    staged, _ = _photos(trained_system, tmp_path / "staged", n=4)

    def camera() -> None:
        for i, p in enumerate(staged):
            time.sleep(0.2)
            (inbox / f"frame{i}{p.suffix}").write_bytes(p.read_bytes())
        (inbox / "frame9.jpg").write_bytes(b"half a jpeg")

    thread = threading.Thread(target=camera)
    thread.start()
    out = tmp_path / "watch.jsonl"
    main(
        [
            "classify",
            "--system",
            str(trained_system),
            "--watch",
            str(inbox),
            "--poll-s",
            "0.1",
            "--idle-exit-s",
            "5",
            "--out",
            str(out),
        ]
    )  # fmt: skip  (idle far above the camera's 0.2 s gaps)
    thread.join()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in records) == [f"frame{i}{p.suffix}" for i, p in enumerate(staged)] + [
        "frame9.jpg"
    ]
    assert sum(bool(r["error"]) for r in records) == 1


def test_expand_paths_keeps_order_and_names_missing(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    for name in ("d/b.png", "d/a.jpg", "d/e/c.JPG", "d/skip.txt"):
        (tmp_path / name).write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in expand_paths([tmp_path / "d", tmp_path / "nope.png"])]
    assert got == ["d/a.jpg", "d/b.png", "d/e/c.JPG", "nope.png"]


def test_nothing_to_classify_is_a_clear_error(trained_system: Path, capsys) -> None:
    from askexpert.cli import main

    with pytest.raises(SystemExit) as info:
        main(["classify", "--system", str(trained_system)])
    assert info.value.code == 2 and "nothing to classify" in capsys.readouterr().err


def _system_copy(trained_system: Path, folder: Path, **serving: float) -> Path:
    import shutil

    shutil.copytree(trained_system, folder, dirs_exist_ok=True)
    raw = SystemDir.open(folder).config().model_dump(mode="json")
    raw["serving"].update(serving)
    raw["routing"].update(gate="max_prob", tau=1.0)  # offload every sample
    (folder / "config.yaml").write_text(json.dumps(raw))
    return folder


def test_a_server_down_at_start_leaves_no_file_unclassified_and_offloading_resumes(
    trained_system: Path, tmp_path: Path
) -> None:
    from askexpert.cli import main
    from askexpert.serving.process import free_port

    system = _system_copy(trained_system, tmp_path / "sys", handshake_retry_s=0.01)
    folder = tmp_path / "frames"
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (1000, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"f{i:04d}.png")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = tmp_path / "down.jsonl"
    main(["classify", "--system", str(system), "--server", url, str(folder), "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 1000 and len({r["path"] for r in records}) == 1000
    assert all(r["source"] == "fallback" and r["label"] is not None for r in records)
    assert all(r["reason"].startswith(f"edge-only: handshake: {url} unreachable") for r in records)
    # the same edge, still running, offloads once the server is up (the handshake is retried)
    with EdgeClient.from_system(system, server=url) as client:
        before = client.classify(images[:8])
        server = ServerProcess(system, port=port)
        try:
            after = client.classify(images[:8])
        finally:
            server.stop()
    assert all(r["source"] == "fallback" for r in before)
    assert any(r["source"] == "expert" for r in after)


def test_a_killed_watch_restarts_and_records_every_file_exactly_once(trained_system: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from askexpert.cli import main

    inbox = tmp_path / "inbox"
    staged, _ = _photos(trained_system, inbox, n=6)
    out = tmp_path / "watch.jsonl"
    cmd = [sys.executable, "-m", "askexpert.cli", "classify", "--system", str(trained_system)]
    proc = subprocess.Popen([*cmd, "--watch", str(inbox), "--poll-s", "0.1", "--out", str(out)])
    try:
        deadline = time.monotonic() + 120
        while not out.is_file() or len(out.read_text().splitlines()) < 6:
            assert proc.poll() is None and time.monotonic() < deadline, "the watcher never recorded the files"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    lines = out.read_text().splitlines()
    torn = json.loads(lines[-1])["path"]
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    more, _ = _photos(trained_system, tmp_path / "later", n=3)
    for i, p in enumerate(more):
        (inbox / f"new{i}{p.suffix}").write_bytes(p.read_bytes())
    main(["classify", "--system", str(trained_system), "--watch", str(inbox), "--poll-s", "0.1",
          "--idle-exit-s", "0.5", "--out", str(out)])  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    paths = sorted(Path(r["path"]) for r in records)
    assert paths == sorted([*staged, *(inbox / f"new{i}{p.suffix}" for i, p in enumerate(more))])
    assert [r["path"] for r in records].count(torn) == 1 and all(r["label"] is not None for r in records)


def test_classify_a_split_records_truth_and_resumes_by_sample(
    trained_system: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`edge` became `classify --split`: the same records (with `truth`), the same ledger, the same table."""
    from askexpert.cli import main

    out = tmp_path / "split.jsonl"
    test = SystemDir.open(trained_system).splits().test
    main(["classify", "--system", str(trained_system), "--split", "test", "--limit", "10", "--out", str(out)])
    main(["classify", "--system", str(trained_system), "--split", "test", "--limit", "20", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [f"test[{i}]" for i in range(20)]  # the first 10 were not redone
    assert [r["truth"] for r in records] == test.labels[:20].tolist()
    right = sum(r["label"] == r["truth"] for r in records[10:]) / 10
    text = capsys.readouterr().out
    row = [line for line in text.splitlines() if line.startswith("│ all ")][-1]  # the second run's table
    assert "10 samples already recorded" in text and row.split("│")[2].strip() == "10"
    assert row.split("│")[3].strip() == f"{right:.4g}"
