"""`askexpert ...`: the command line. Most commands parse options and call one stage function;
`export onnx` adds the runtime comparison (a report, not a stage) to its stage's output."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from askexpert.config import SynthConfig, SystemConfig
from askexpert.errors import AskExpertError, CheckpointVersionWarning

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub: weights come from local files only

app = typer.Typer(
    help="Collaborative ViT inference: an edge generalist asks near-edge experts. "
    "An option marked 'saved to config' always writes config.yaml (a stage's setting, so reruns and later "
    "stages agree); every other option is for this run only and never does. `evaluate --apply` and "
    "`calibrate` (without --dry-run) write the routing point they choose.",
    no_args_is_help=True,
)
data_app = typer.Typer(help="Data sets.", no_args_is_help=True)
train_app = typer.Typer(help="Training stages.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
profile_app = typer.Typer(help="Device profiles for the testbed.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI get whole tables
err_console = Console(stderr=True, soft_wrap=True)  # one unbroken line per error

SystemOpt = Annotated[Path, typer.Option("--system", "-s", help="System directory (holds config.yaml).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its output is up to date.")]


# The CLI's fixed choices: typer lists an enum's values in --help and refuses others in one phrasing.
Mismatch = StrEnum("Mismatch", [("fail", "fail"), ("edge_only", "edge-only")])
Engine = StrEnum("Engine", [("http", "http"), ("ray", "ray")])
Runtime = StrEnum("Runtime", [("auto", "auto"), ("torch", "torch"), ("onnx", "onnx"), ("onnx_int8", "onnx-int8")])
Tier = StrEnum("Tier", [("edge", "edge"), ("near_edge", "near-edge")])
Emulate = StrEnum("Emulate", [("auto", "auto"), ("on", "on"), ("off", "off")])
Minimise = StrEnum("Minimise", [("latency", "latency"), ("energy", "energy")])
Split = StrEnum("Split", [("val", "val"), ("test", "test")])


MismatchOpt = Annotated[
    Mismatch,
    typer.Option(
        help="When the server's experts differ from partition.json: fail, or edge-only (every record: mismatch).",
        case_sensitive=False,
    ),
]


def _system(path: Path) -> Any:
    from askexpert.system import SystemDir

    return SystemDir.open(path)


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A rich table; headers wrap at their underscores instead of being cut off on narrow terminals.

    Floats show 4 significant digits (the CSV/JSON files keep full precision).
    """
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column.replace("_", " "), overflow="fold", no_wrap=i == 0)

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    for row in rows:
        table.add_row(*[cell(row.get(c)) for c in columns])
    console.print(table)


@app.command()
def init(
    directory: Path,
    config: Annotated[
        Path | None, typer.Option(help="Start from this YAML config instead of the demo default.")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Create a system directory with a config.yaml."""
    from askexpert.system import SystemDir

    cfg = SystemConfig.from_yaml(config) if config else SystemConfig()
    system = SystemDir.create(directory, cfg, overwrite=force)
    console.print(f"created {system.config_path}")


@app.command("presets")
def list_presets(
    latency: Annotated[
        bool, typer.Option(help="Also time one image (batch 1) on this machine with torch and ONNX Runtime.")
    ] = True,
) -> None:
    """List the model presets: parameters, FLOPs and batch-1 latency (torch, ONNX Runtime) on this machine."""
    from rich.progress import track

    from askexpert.measure.device_timing import batch1_latency
    from askexpert.models import presets
    from askexpert.models.registry import model_cost

    rows = []
    for p in track(list(presets().values()), description="measuring presets", console=err_console, transient=True):
        cost = model_cost(p.name)
        row: dict[str, Any] = {
            "name": p.name,
            "role": p.role,
            "timm": p.timm_name,
            "px": p.img_size,
            "params_M": cost["params"] / 1e6,
            "GFLOPs_per_image": cost["flops"] / 1e9,
        }
        if latency:
            timing = batch1_latency(p.name)
            row.update(torch_ms=timing["torch_ms"], onnx_ms=timing["onnx_ms"])
        rows.append({**row, "note": p.note})
    title = "model presets (100 outputs; FLOPs: 2 per multiply-add"
    title += "; ms: one image at batch 1, median, this machine)" if latency else ")"
    print_table(title, rows, list(rows[0]))


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write train.npz, test.npz, meta.json into.")],
    num_groups: int = 20,
    classes_per_group: int = 5,
    train_per_class: int = 100,
    test_per_class: int = 20,
    seed: int = 0,
) -> None:
    """Generate the synthetic data set (deterministic by seed)."""
    from askexpert.data import synth

    cfg = SynthConfig(
        num_groups=num_groups,
        classes_per_group=classes_per_group,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        seed=seed,
    )
    synth.write(cfg, out)
    console.print(f"wrote {out} ({num_groups * classes_per_group} classes)")


@train_app.command("backbone")
def train_backbone_cmd(
    system: SystemOpt,
    preset: Annotated[
        list[str] | None, typer.Option(help="Preset to pretrain (repeatable); default: the generalist's and expert's.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Image-folder tree (train/<class>/..., test/<class>/...) to pretrain on; saved to config."),
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Pretraining epochs (saved to config).")] = None,
    force: ForceOpt = False,
) -> None:
    """Pretrain backbones on another data set; generalist and experts then start from them (head replaced)."""
    from askexpert.training.shared import train_backbones

    sysdir = _system(system)
    if data is not None:
        sysdir.update_config(
            "--data", backbone={"data": {"source": "folder", "root": str(data.expanduser().resolve())}}
        )
    if epochs is not None:
        sysdir.update_config("--epochs", backbone={"training": {"epochs": epochs}})
    metas = train_backbones(sysdir, preset or None, force=force)
    rows = [{"preset": m.preset, "classes": len(m.classes), **m.metrics} for m in metas]
    print_table("pretrained backbones", rows, ["preset", "classes", "val_accuracy", "train_loss"])


@train_app.command("generalist")
def train_generalist_cmd(system: SystemOpt, force: ForceOpt = False) -> None:
    """Train the edge generalist on all classes."""
    from askexpert.training.generalist import train_generalist

    meta = train_generalist(_system(system), force=force)
    console.print(f"generalist: validation accuracy {meta.metrics['val_accuracy']:.4f}")


@train_app.command("experts")
def train_experts_cmd(
    system: SystemOpt,
    schedule: Annotated[
        str | None,
        typer.Option(help="A schedule named in the config (static, progressive, ...); default: serving.schedule."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Train one expert per partition subset under a schedule."""
    from askexpert.training.experts import train_experts

    sysdir = _system(system)
    schedule = schedule or sysdir.config().serving.schedule
    metas = train_experts(sysdir, schedule, force=force)
    rows = [{"expert": m.expert_id, "classes": len(m.classes) - 1, **m.metrics} for m in metas]
    print_table(f"{schedule} experts", rows, ["expert", "classes", "val_subset_accuracy"])


@app.command()
def partition(
    system: SystemOpt,
    strategy: Annotated[str | None, typer.Option(help="superclass | confusion | random (saved to config).")] = None,
    num_experts: Annotated[int | None, typer.Option(help="Number of experts (saved to config).")] = None,
    overlap: Annotated[
        int | None, typer.Option(help="confusion: outside classes each expert also takes (saved to config).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Assign classes to experts and write partition.json."""
    from askexpert.training.partition_stage import build_partition

    sysdir = _system(system)
    options = (("strategy", strategy), ("num_experts", num_experts), ("overlap", overlap))
    chosen = {k: v for k, v in options if v is not None}
    if chosen:
        sysdir.update_config("--strategy/--num-experts/--overlap", partition=chosen)
    part = build_partition(sysdir, force=force)
    rows = [
        {"expert": e, "classes": len(s), "members": " ".join(map(str, s[:12])) + (" ..." if len(s) > 12 else "")}
        for e, s in zip(part.expert_ids, part.subsets, strict=True)
    ]
    print_table(f"partition ({part.strategy})", rows, ["expert", "classes", "members"])
    if "confusion_kept" in part.stats:
        console.print(
            f"share of the generalist's validation errors kept inside one expert: {part.stats['confusion_kept']:.3f}"
        )


def _print_summary(summary: dict[str, Any]) -> None:
    print_table(
        "headline (test split)",
        summary["headline"],
        ["schedule", "system", "accuracy", "offload_rate", "routing_hit_rate", "abstain_rate"],
    )
    schedules = summary["schedules"]
    columns = ["expert", "classes", "generalist", "generalist closed-set"]
    columns += [f"{s}{x}" for s in schedules for x in ("", " open-set")]
    print_table("experts on their own subsets (test split; closed-set and open-set)", summary["experts"], columns)
    if summary.get("combination_rules"):
        print_table(
            "combination rules, each at its best validation point",
            summary["combination_rules"],
            ["schedule", "rule", "point", "val_accuracy", "test_accuracy", "test_offload_rate"],
        )
    if summary.get("versus_static"):
        print_table(
            "minus static (accuracy, fraction)",
            summary["versus_static"],
            ["schedule", "closed_set_subsets", "open_set_subsets", "system"],
        )
    if summary.get("gates"):
        print_table(
            "gates (test; τ set on validation): parity offload, accuracy at 10/20/30 % offload",
            summary["gates"],
            [
                "schedule",
                "gate",
                "k",
                "parity_test_offload",
                "test_accuracy_at_10",
                "test_accuracy_at_20",
                "test_accuracy_at_30",
                "oracle_share_at_30",
            ],
        )
    if summary.get("deferral_gate"):
        gate = summary["deferral_gate"]
        console.print(f"learned gate ({gate['schedule']}, k={gate['k']}, {gate['form']} form): {gate['path']}")
    console.print(f"report: {summary['report']}")


@app.command()
def evaluate(
    system: SystemOpt,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply", help="Write the point chosen on validation for serving.schedule into config.yaml (routing.*)."
        ),
    ] = False,
) -> None:
    """Cache every model's outputs once, choose gate/τ/k/rule on validation, report the test split."""
    from askexpert.evaluate.run import apply_choice, evaluate_system

    sysdir = _system(system)
    summary = evaluate_system(sysdir)
    _print_summary(summary)
    if apply:
        console.print(f"config.yaml routing: {apply_choice(sysdir, summary)}")


@app.command()
def demo(
    system: Annotated[
        Path, typer.Option("--system", "-s", help="System directory (created with the demo config).")
    ] = Path("askexpert-demo"),
    config: Annotated[Path | None, typer.Option(help="Config for a new system directory.")] = None,
) -> None:
    """The whole pipeline on the embedded default: data → generalist → partition → experts → evaluate."""
    from askexpert.pipeline import open_or_create, run_pipeline

    sysdir = open_or_create(system, SystemConfig.from_yaml(config) if config else None)
    summary = run_pipeline(sysdir, log=console.print)
    _print_summary(summary)
    total = sum(summary["timings_s"].values())
    console.print(f"total stage time: {total:.1f} s")


def _serving_overrides(items: list[str]) -> dict[str, object]:
    """`--set KEY=VALUE` items as serving settings (values read as YAML: numbers, booleans, words); validated
    later, with the rest of the config."""
    import yaml

    from askexpert.errors import ConfigError

    overrides: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("serving.")
        if not sep or not key:
            raise ConfigError(f"--set wants serving.KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: {value!r} is not a value") from None
    return overrides


def _read_token(token_file: Path | None) -> str | None:
    from askexpert.errors import ConfigError

    if token_file is None:
        return None
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{token_file}: cannot read the token file: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{token_file}: the token file is empty")
    return token


RuntimeOpt = Annotated[
    Runtime,
    typer.Option(
        help="The generalist's runtime; auto: the exported ONNX model when current (`export onnx`), else torch."
    ),
]
TokenOpt = Annotated[Path | None, typer.Option("--token-file", help="Bearer token (first line of this file).")]
CaOpt = Annotated[
    Path | None, typer.Option("--ca-file", help="CA certificate (PEM) the https server's certificate must chain to.")
]


@app.command()
def serve(
    system: SystemOpt,
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you say otherwise.")] = "127.0.0.1",
    port: int = 8000,
    schedule: Annotated[str | None, typer.Option(help="Which expert set to host (default: serving.schedule).")] = None,
    engine: Annotated[Engine, typer.Option(help="http (FastAPI + uvicorn) or ray (Ray Serve).")] = Engine.http,
    token_file: TokenOpt = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N or auto; default: the config's `device`.")
    ] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(help="serving.max_wait_ms (batching wait) for this run; config.yaml is unchanged.")
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="serving.KEY=VALUE for this run (repeatable; YAML values, e.g. --set max_batch_size=8); "
            "config.yaml is unchanged.",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve https with this certificate (PEM; with --tls-key).")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The certificate's private key (PEM).")] = None,
) -> None:
    """Host every expert of a system directory (the near-edge server)."""
    # Before torch loads: the model's OpenMP threads must sleep, not spin, between
    # batches, or they take the cores the event loop needs to receive the next batch
    # (measured on 2 cores: 2,496 → 2,878 images/s at 32 clients).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from askexpert.errors import ConfigError

    token = _read_token(token_file)
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: TLS file not found")
    if engine is Engine.ray and device is not None:
        raise ConfigError("--device is for the http engine; Ray places its replicas by serving.ray_num_gpus")
    overrides = _serving_overrides(setting or [])
    if max_wait_ms is not None:
        overrides["max_wait_ms"] = max_wait_ms
    tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    import uvicorn  # noqa: F401 - first, for both engines: without the serve extra, that is the install line to name

    from askexpert.serving.listen import listen_socket
    from askexpert.system import SystemDir

    opened = SystemDir.open(system)  # opened once: both engines take it as it is
    opened.config().with_serving(overrides)  # a bad setting is named before the port is taken
    if engine is Engine.ray:
        try:
            from askexpert.serving.ray_app import run_ray
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] != "ray":
                raise  # another extra's module: main() names its install line
            raise ConfigError("--engine ray needs Ray Serve: pip install 'askexpert[ray]'") from None
    # the API's socket before the experts load or Ray starts: a taken port fails now; closed however serving ends
    with listen_socket(host, port) as sock:
        if engine is Engine.ray:
            url = f"{'https' if tls else 'http'}://{host}:{port}"
            console.print(f"starting Ray Serve: the experts' deployments, then the HTTP API on {url}", highlight=False)
            run_ray(opened, sock, schedule, token, tls, overrides)
            return
        from askexpert.serving.server import ExpertService, create_app, serve_http

        service = ExpertService.from_system(opened, schedule, device, serving=overrides)
        scheme = "https" if tls is not None else "http"
        import torch

        threads = f"{torch.get_num_threads()} thread(s) per call"
        console.print(
            f"serving {len(service.classes)} experts on {scheme}://{host}:{port} ({service.cfg.describe()}, {threads})",
            highlight=False,
            soft_wrap=True,  # one line, whatever the terminal's width: benchmarks read it from the log
        )
        serve_http(create_app(service, token), sock, service.cfg, tls)


@app.command()
def classify(
    system: SystemOpt,
    paths: Annotated[
        list[str] | None, typer.Argument(help="Image files, folders (recursive) or glob patterns.")
    ] = None,
    server: Annotated[str | None, typer.Option(help="Expert server URL; none: the edge answers alone.")] = None,
    local_experts: Annotated[
        bool, typer.Option("--local-experts", help="Ask the system's own expert checkpoints in this process.")
    ] = False,
    split: Annotated[
        Split | None, typer.Option(help="Also classify this split of the system's data (records carry `truth`).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="With --split: only its first N samples.", min=1)] = None,
    stdin: Annotated[bool, typer.Option("--stdin", help="Also read paths from standard input, one per line.")] = False,
    watch: Annotated[
        Path | None, typer.Option(help="Watch this folder: classify files as they appear (Ctrl-C stops).")
    ] = None,
    poll_s: Annotated[float, typer.Option(help="Watch: seconds between looks at the folder.")] = 0.5,
    idle_exit_s: Annotated[
        float | None, typer.Option(help="Watch: stop after this many seconds without a new file.")
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Records: .jsonl or .csv (by suffix). Appended to: files it already records are skipped, "
            "so a killed run restarts where it stopped."
        ),
    ] = Path("classified.jsonl"),
    fresh: Annotated[bool, typer.Option("--fresh", help="Start the records file over instead.")] = False,
    runtime: RuntimeOpt = Runtime.auto,
    profile: Annotated[
        str | None,
        typer.Option(help="Edge device profile (name or YAML): run on its thread count, add its modelled times."),
    ] = None,
    token_file: TokenOpt = None,
    ca_file: CaOpt = None,
    on_mismatch: MismatchOpt = Mismatch.fail,
) -> None:
    """Classify images (any size and format Pillow reads) or a data split; one record per sample, bad files too."""
    from askexpert.errors import ConfigError
    from askexpert.inference.client import EdgeClient, expand_paths
    from askexpert.inference.records import RecordWriter, Tally, watch_folder

    items = list(paths or [])
    if stdin:
        items += [line.strip() for line in sys.stdin if line.strip()]
    if not items and watch is None and split is None:
        raise ConfigError("nothing to classify: give paths, --split, --stdin or --watch")
    if limit is not None and split is None:
        raise ConfigError("--limit counts samples of a --split")
    threads, slowdown = 0, None
    if profile is not None:
        from askexpert.measure.profiles import load_device

        device = load_device(profile)
        threads, slowdown = device.threads_here(), device.slowdown
        console.print(
            f"edge profile {device.name}: generalist on {threads} thread(s) (measured here); "
            f"edge_ms_modelled = edge_ms × {device.slowdown:g} (modelled scaling to the device)"
        )
    sysdir = _system(system)
    tally = Tally()
    with (
        EdgeClient.from_system(
            sysdir, server, _read_token(token_file), on_mismatch.value, local_experts, runtime.value, threads,
            ca_file, slowdown,
        ) as client,
        RecordWriter(out, fresh) as writer,
    ):  # fmt: skip
        if writer.done:
            console.print(f"{out}: {len(writer.done)} samples already recorded, skipped")

        def todo(batch: list[str] | list[Path]) -> list[Path]:
            return [p for p in expand_paths(batch) if str(p) not in writer.done]

        sources: list[Any] = []
        if split is not None:
            data = getattr(sysdir.splits(), split.value)
            data = data.subset(np.arange(min(limit or len(data), len(data))))
            sources.append(client.classify_split(data, split.value, writer.done))
        if items:
            sources.append(client.iter_classify(todo(items)))
        if watch is not None:
            console.print(f"watching {watch} (every {poll_s:g} s) ...")
            sources.append(
                r for batch in watch_folder(watch, poll_s, idle_exit_s) for r in client.iter_classify(todo(batch))
            )
        for source in sources:
            for record in source:
                writer.write(record)
                tally.add(record)
    print_table("classified", tally.rows(), ["outcome", "files", "accuracy", "mean_ms", "p99_ms", "bytes_sent"])
    console.print(f"records: {out}")


@profile_app.command("measure")
def profile_measure(
    system: SystemOpt,
    out: Annotated[Path, typer.Option(help="Profile YAML to write (copy it back from the device).")],
    name: Annotated[str, typer.Option(help="Profile name, e.g. my-raspberry-pi.")],
    idle_w: Annotated[float, typer.Option(help="Idle power of the device in watts (from a meter or its datasheet).")],
    active_w: Annotated[float, typer.Option(help="Power while computing, in watts.")],
    tier: Annotated[Tier, typer.Option(help="Which tier the device is.")] = Tier.edge,
    threads: Annotated[int, typer.Option(help="Torch threads (0: torch's default).")] = 0,
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,2,4,8,16,32,64",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Time the system's generalist and an expert on THIS machine; write a profile the testbed uses as measured."""
    from askexpert.errors import ConfigError
    from askexpert.measure.device_timing import measure_profile, write_profile

    try:
        sizes = tuple(int(b) for b in batches.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batches must be integers separated by commas, got {batches!r}") from None
    profile = measure_profile(_system(system), name, tier.value, idle_w, active_w, threads, sizes, device=device)
    write_profile(profile, out)
    assert profile.measured is not None
    rows = [
        {"batch": b, **{f"{role}_ms": profile.measured.ms[role][b] for role in ("generalist", "expert")}} for b in sizes
    ]
    print_table(f"measured on {profile.measured.device}", rows, ["batch", "generalist_ms", "expert_ms"])
    console.print(f"wrote {out}; use it with `askexpert testbed --edge {out}` (or --near-edge)")


def _taus(text: str | None) -> list[float] | None:
    from askexpert.errors import ConfigError

    if text is None:
        return None
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--taus must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"--taus values must lie in [0, 1], got {text!r}")
    return values


@app.command()
def testbed(
    system: SystemOpt,
    edge: Annotated[str, typer.Option(help="Edge device profile (name or YAML path).")] = "raspberry-pi-4",
    near_edge: Annotated[str, typer.Option(help="Near-edge device profile (name or YAML path).")] = "desktop-gpu",
    link: Annotated[str, typer.Option(help="Link preset: wired, wifi, lte.")] = "wifi",
    samples: Annotated[int, typer.Option(help="Test samples, classified one at a time.")] = 500,
    taus: Annotated[str | None, typer.Option(help="Comma-separated τ values for the collaborative rows.")] = None,
    emulate: Annotated[Emulate, typer.Option(help="Emulated link (on: needs root), the link model (off), or auto.")] = (
        Emulate.auto
    ),
) -> None:
    """Latency and energy per sample: edge only, edge execution, near-edge only, collaborative at several τ."""

    # The edge side keeps OpenMP's default wait policy: PASSIVE would make every op of a batch-1
    # pass wake its threads (measured: a 1.3 ms generalist pass took 3.8 ms). The server gets
    # PASSIVE (testbed.measurement), so its idle threads leave the shared cores to the edge.
    from askexpert.testbed.runner import TABLE_COLUMNS, run_testbed, spec_from_names

    summary = run_testbed(_system(system), spec_from_names(edge, near_edge, link), samples, _taus(taus), emulate.value)
    print_table(f"testbed ({summary['samples']} samples, link {link})", summary["table"], TABLE_COLUMNS)
    from askexpert.testbed.report import headline_lines

    for line in headline_lines(summary["headline"]):
        console.print(line.rstrip("\n"), highlight=False, markup=False)
    for key, value in summary["provenance"].items():
        console.print(f"{key}: {value}", highlight=False)
    console.print(f"written to {summary['out']}/")


@app.command()
def calibrate(
    system: SystemOpt,
    latency_budget_ms: Annotated[float | None, typer.Option(help="Max mean latency per sample.")] = None,
    energy_budget_mj: Annotated[float | None, typer.Option(help="Max mean energy per sample.")] = None,
    accuracy_floor: Annotated[float | None, typer.Option(help="Min accuracy (validation split).")] = None,
    minimise: Annotated[Minimise, typer.Option(help="With only a floor: what to minimise.")] = Minimise.latency,
    testbed_json: Annotated[
        Path | None, typer.Option(help="Testbed results (default DIR/testbed/testbed.json).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the choice without writing config.yaml.")] = False,
) -> None:
    """Choose τ and k for a budget from cached validation outputs and a testbed's costs; write them to config."""
    from askexpert.testbed.calibrate import calibrate as run_calibrate

    result = run_calibrate(
        _system(system),
        testbed_json,
        latency_budget_ms,
        energy_budget_mj,
        accuracy_floor,
        minimise.value,
        write=not dry_run,
    )
    c = result["chosen"]
    console.print(
        f"chosen: τ={c['tau']:.4f}, k={c['k']}: predicted accuracy {c['accuracy']:.4f} (validation), "
        f"offload rate {c['offload_rate']:.3f}, latency {c['latency_ms']:.2f} ms, energy {c['energy_mj']:.2f} mJ",
        highlight=False,
    )
    console.print(
        "not written (--dry-run)" if dry_run else f"written to {system}/config.yaml (routing.tau, routing.top_k)"
    )


export_app = typer.Typer(help="Export models for edge runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
def export_onnx_cmd(
    system: SystemOpt,
    int8: Annotated[bool, typer.Option(help="Also write a dynamic-INT8 model.")] = True,
    force: ForceOpt = False,
) -> None:
    """Export the generalist to ONNX (and INT8) for the edge; compare accuracy and latency with PyTorch (test split)."""
    import json

    from askexpert.evaluate.report import write_csv
    from askexpert.models import load_checkpoint, predict_logits
    from askexpert.models.onnx_export import compare_runtimes
    from askexpert.models.onnx_runtime import OnnxGeneralist
    from askexpert.training.export_stage import export_generalist

    sysdir = _system(system)
    paths = export_generalist(sysdir, int8, force)
    model, _ = load_checkpoint(sysdir.generalist_path)
    runtimes: dict[str, Any] = {"torch": lambda x: predict_logits(model, x)}
    runtimes |= {name: OnnxGeneralist(path) for name, path in zip(("onnx", "onnx-int8"), paths, strict=False)}
    test = sysdir.splits().test
    rows = compare_runtimes(runtimes, test.images, test.labels)
    sysdir.report_dir.mkdir(parents=True, exist_ok=True)
    write_csv(sysdir.report_dir / "edge_runtimes.csv", rows)
    (sysdir.report_dir / "edge_runtimes.json").write_text(json.dumps(rows, indent=1))
    print_table("edge runtimes (generalist, test split)", rows, ["runtime", "accuracy", "agreement", "ms_per_image"])
    console.print(f"edge model: {' and '.join(str(p) for p in paths)}")


# The optional stacks: which extra brings each top-level module the core (edge) install leaves out.
_EXTRA_OF = dict.fromkeys(["torch", "torchvision", "timm", "safetensors", "sklearn", "scipy", "matplotlib", "onnx",
                           "onnxscript", "pynvml"], "train")  # fmt: skip
_EXTRA_OF |= dict.fromkeys(["fastapi", "uvicorn", "starlette", "prometheus_client"], "serve")
_EXTRA_OF["ray"] = "ray"


def main(argv: Sequence[str] | None = None) -> None:
    import warnings

    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        """askexpert's own warnings are for users: one line on stderr, no source excerpt."""
        if issubclass(category, CheckpointVersionWarning):
            err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False)
        else:
            previous(message, category, *args, **kwargs)

    warnings.showwarning = show
    import logging

    ours = logging.getLogger("askexpert")  # our own notices only; libraries (httpx, ...) stay at their defaults
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("askexpert: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except (AskExpertError, ValueError, FloatingPointError) as exc:
        # ours name the problem; numbers out of range are the user's to fix too, named by their type
        text = str(exc) if isinstance(exc, AskExpertError) else f"{type(exc).__name__}: {exc}"
        err_console.print("[bold red]error:[/]", end=" ")
        err_console.print(text, markup=False, highlight=False)
        sys.exit(2)
    except ModuleNotFoundError as exc:  # a command of a stack this install left out (the edge is the core)
        extra = _EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        err_console.print("[bold red]error:[/]", end=" ")
        err_console.print(
            f"{exc.name} is not installed: this command needs pip install 'askexpert[{extra}]'",
            markup=False,
            highlight=False,
        )
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # usage errors (typer's own click, or click)
        import click

        if isinstance(exc, click.ClickException | typer.TyperException) and hasattr(exc, "show"):
            exc.show()
            sys.exit(int(getattr(exc, "exit_code", 2)))
        raise
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    main()
