import json
from pathlib import Path

import pytest

from askexpert.cli import main


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out + out.err


def test_missing_system_dir_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _run(["evaluate", "--system", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "not a system directory" in text and "Traceback" not in text


def test_malformed_config_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.yaml").write_text("routing:\n  top_k: 0\n")
    code, text = _run(["train", "generalist", "--system", str(tmp_path)], capsys)
    assert code == 2 and "routing.top_k" in text


def test_init_then_partition_options_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["init", str(tmp_path / "s")])
    assert (tmp_path / "s" / "config.yaml").is_file()
    code, text = _run(["partition", "--system", str(tmp_path / "s"), "--strategy", "astrology"], capsys)
    assert code == 2 and "partition.strategy" in text
    code, text = _run(["partition", "--system", str(tmp_path / "s"), "--strategy", "random", "--overlap", "2"], capsys)
    assert code == 2 and "overlap=2 needs strategy 'confusion'" in text and "Traceback" not in text
    code, text = _run(["init", str(tmp_path / "s")], capsys)
    assert code == 2 and "already exists" in text


def test_train_experts_needs_a_partition(
    trained_system: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_system, copy)
    (copy / "partition.json").unlink()
    code, text = _run(["train", "experts", "--system", str(copy), "--schedule", "static"], capsys)
    assert code == 2 and "partition.json: partition file not found" in text
    code, text = _run(["train", "experts", "--system", str(copy), "--schedule", "warp"], capsys)
    assert code == 2 and "unknown schedule 'warp'" in text


def _generalist_from_old_timm(trained_system: Path, tmp_path: Path) -> Path:
    """A copy of the system whose generalist says it was written under timm 0.9.2."""
    import shutil

    system = tmp_path / "copy"
    shutil.copytree(trained_system, system)
    side = system / "generalist.json"
    meta = json.loads(side.read_text())
    meta["versions"]["timm"] = "0.9.2"
    side.write_text(json.dumps(meta))
    return system


def test_checkpoint_version_warning_is_one_line(
    trained_system: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = _generalist_from_old_timm(trained_system, tmp_path)
    main(["evaluate", "--system", str(system)])
    err = capsys.readouterr().err
    assert "warning: " in err and "generalist.json: written under timm 0.9.2" in err
    assert "CheckpointVersionWarning" not in err  # no Python warning format, no source line


def test_edge_start_up_reads_the_generalist_metadata_once(
    trained_system: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runtime choice, the export check and the class names share one read: one warning, not three."""
    from PIL import Image

    system = _generalist_from_old_timm(trained_system, tmp_path)
    image = tmp_path / "one.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    out = tmp_path / "records.jsonl"
    main(["classify", "--system", str(system), str(image), "--out", str(out)])
    assert capsys.readouterr().err.count("generalist.json: written under timm 0.9.2") == 1
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["path"] == str(image) and record["error"] is None


def test_evaluate_apply_writes_the_validation_choice(trained_system: Path, tmp_path: Path) -> None:
    import shutil

    from askexpert.cli import main
    from askexpert.config import SystemConfig

    copy = tmp_path / "sys"
    shutil.copytree(trained_system, copy)
    main(["evaluate", "--system", str(copy), "--apply"])
    summary = json.loads((copy / "report" / "summary.json").read_text())
    cfg = SystemConfig.from_yaml(copy / "config.yaml")
    chosen = summary["chosen_on_validation"][cfg.serving.schedule]
    assert (cfg.routing.gate, cfg.routing.tau, cfg.routing.top_k) == (chosen["gate"], chosen["tau"], chosen["top_k"])
    assert (cfg.routing.combine, cfg.routing.mix_weight) == (chosen["combine"], chosen["mix_weight"])


@pytest.mark.parametrize(
    ("args", "option", "choices"),
    [
        (["serve", "--engine", "grpc"], "--engine", ["http", "ray"]),
        (["classify", "x.jpg", "--on-mismatch", "ignore"], "--on-mismatch", ["fail", "edge-only"]),
        (["classify", "--split", "test", "--runtime", "tflite"], "--runtime", ["auto", "torch", "onnx", "onnx-int8"]),
        (["testbed", "--emulate", "maybe"], "--emulate", ["auto", "on", "off"]),
    ],
)
def test_choices_are_listed_in_help_and_refused_with_one_phrasing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    option: str,
    choices: list[str],
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # a choice list wrapped mid-word would hide a choice from the check
    main(["init", str(tmp_path / "s")])
    code, text = _run([*args, "--system", str(tmp_path / "s")], capsys)
    assert code == 2 and f"Invalid value for '{option}'" in text and "Traceback" not in text
    assert all(repr(c) in text for c in choices), text
    main([args[0], "--help"])  # help returns normally
    text = capsys.readouterr().out
    assert all(c in text for c in choices), text


def test_serve_opens_its_system_directory_once(trained_system: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN: a command opens its system directory once and hands it down (the engine reads the same object)."""
    import askexpert.serving.server as server
    from askexpert.serving.process import free_port
    from askexpert.system import SystemDir

    opened: list[Path] = []
    real_open = SystemDir.open.__func__  # type: ignore[attr-defined]

    def counted(cls: type[SystemDir], root: str | Path) -> SystemDir:
        opened.append(Path(root))
        return real_open(cls, root)

    monkeypatch.setattr(SystemDir, "open", classmethod(counted))
    monkeypatch.setattr(server, "serve_http", lambda app, sock, cfg, tls: None)
    main(["serve", "--system", str(trained_system), "--port", str(free_port())])
    assert opened == [trained_system]


def test_serve_overrides_are_validated_before_any_model_loads(
    trained_system: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import askexpert.serving.server as server
    from askexpert.serving.process import free_port

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server started")

    monkeypatch.setattr(server, "serve_http", started)
    code, text = _run(["serve", "--system", str(trained_system), "--max-wait-ms", "-1"], capsys)
    assert code == 2 and "serving.max_wait_ms" in text and "Traceback" not in text
    for bad, named in (
        (["--set", "max_batch_size"], "--set wants serving.KEY=VALUE"),
        (["--set", "nope=3"], "serving.nope"),
        (["--set", "serving.max_batch_size=0"], "serving.max_batch_size"),
        (["--engine", "ray", "--set", "model_workers=zero"], "serving.model_workers"),  # before Ray starts
        (["--engine", "ray", "--device", "cpu"], "--device is for the http engine"),  # not silently ignored
    ):
        code, text = _run(["serve", "--system", str(trained_system), *bad], capsys)
        assert code == 2 and named in text and "Traceback" not in text, text
    served: list[object] = []
    monkeypatch.setattr(server, "serve_http", lambda app, sock, cfg, tls: served.append(app))
    settings = ["--set", "max_batch_size=8", "--set", "test_time_flip=no", "--port", str(free_port())]
    main(["serve", "--system", str(trained_system), *settings])  # returns: serve_http is the stand-in above
    assert len(served) == 1
    cfg = served[0].service.cfg  # type: ignore[attr-defined]  # the admission middleware around the app
    assert (cfg.max_batch_size, cfg.test_time_flip) == (8, False)  # read as YAML: a number, a boolean
    from askexpert.config import SystemConfig
    from askexpert.serving.server import ExpertService

    before = SystemConfig.from_yaml(trained_system / "config.yaml").serving.max_wait_ms
    service = ExpertService.from_system(trained_system, serving={"max_wait_ms": before + 3.0})
    assert service.max_wait_ms == before + 3.0 == service.cfg.max_wait_ms  # validated, and what the batcher reads
    assert SystemConfig.from_yaml(trained_system / "config.yaml").serving.max_wait_ms == before  # file unchanged
