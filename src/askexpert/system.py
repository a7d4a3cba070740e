"""The system directory: one folder every stage reads and writes.

```
DIR/config.yaml                        SystemConfig
DIR/data/                              the generated data set (synth source)
DIR/partition.json                     class → expert partition
DIR/backbones/<preset>.safetensors     pretrained backbones (`train backbone`)
DIR/generalist.safetensors (+ .json)   edge model and its metadata
DIR/stage1.safetensors (+ .json)       shared all-class stage 1 of progressive experts
DIR/experts/<schedule>/<id>.safetensors (+ .json)
DIR/generalist.onnx (+ .onnx.json)     the generalist exported for the edge (`export onnx`, the demo);
DIR/generalist.int8.onnx (+ .json)     the sidecar names the checkpoint it was exported from
DIR/cache/logits-<hash>.npz            cached test-split outputs
DIR/deferral_gate.json                 the learned gate (`evaluate` fits it on validation)
DIR/report/                            report.md, CSV, JSON, PNG
```
Written by stages outside this class (their paths are built where they are written):
`DIR/testbed/` (`askexpert testbed`), the extracted data of a folder source under its
`root`, and the benchmarks' files under `DIR/report/`.
Experts live one folder per schedule so static and progressive sets sit side
by side for comparison.

A command opens its directory once and hands the `SystemDir` down: it parses
config.yaml and partition.json once (again only if their bytes change, as
when a stage writes them) and loads the data splits once per data config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from askexpert.config import DataConfig, SystemConfig
from askexpert.errors import ConfigError
from askexpert.partition import Partition

if TYPE_CHECKING:
    from askexpert.data import Splits
    from askexpert.models.meta import CheckpointMeta

T = TypeVar("T")


@dataclass(frozen=True)
class SystemDir:
    root: Path
    _loaded: dict[str, tuple[object, Any]] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, system: str | Path | SystemDir) -> SystemDir:
        """An open system as is, or a path opened."""
        return system if isinstance(system, SystemDir) else cls.open(system)

    @classmethod
    def open(cls, root: str | Path) -> SystemDir:
        path = Path(root)
        if not (path / "config.yaml").is_file():
            raise ConfigError(
                f"{path}: not a system directory (no config.yaml); create one with `askexpert init {path}`"
            )
        return cls(path)

    @classmethod
    def create(cls, root: str | Path, config: SystemConfig, overwrite: bool = False) -> SystemDir:
        path = Path(root)
        if (path / "config.yaml").exists() and not overwrite:
            raise ConfigError(f"{path}/config.yaml already exists; pass --force to overwrite it")
        path.mkdir(parents=True, exist_ok=True)
        config.to_yaml(path / "config.yaml")
        return cls(path)

    def _cached(self, name: str, key: object, load: Callable[[], T]) -> T:
        hit = self._loaded.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = load()
        self._loaded[name] = (key, value)
        return value

    def _bytes(self, path: Path, missing: str) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{path}: {missing}") from None

    def config(self) -> SystemConfig:
        """The parsed, validated config.yaml (parsed again only when the file's bytes change)."""
        raw = self._bytes(self.config_path, "not found; create the system with `askexpert init`")
        return self._cached("config", raw, lambda: SystemConfig.from_yaml(self.config_path))

    def partition(self) -> Partition:
        """partition.json, parsed once (and again only when a stage rewrites it)."""
        raw = self.partition_path.read_bytes() if self.partition_path.is_file() else None  # None: from_json says so
        return self._cached("partition", raw, lambda: Partition.from_json(self.partition_path))

    def generalist_meta(self) -> CheckpointMeta:
        """generalist.json, read once (again only when a stage rewrites it): the edge asks it for the
        runtime, the export's freshness and the class names, and a version warning should show once."""
        from askexpert.models.meta import meta_path, read_meta

        side = meta_path(self.generalist_path)
        raw = side.read_bytes() if side.is_file() else None  # None: read_meta names the missing file
        return self._cached("generalist_meta", raw, lambda: read_meta(self.generalist_path))

    def splits(self, data: DataConfig | None = None) -> Splits:
        """Train / validation / test of `data` (default: the config's), loaded once per data config."""
        from askexpert.data import load_splits  # the edge never loads a split

        data = data or self.config().data
        return self._cached(f"splits/{data.model_dump_json()}", True, lambda: load_splits(data, self.root))

    def update_config(self, origin: str, **sections: dict[str, Any]) -> SystemConfig:
        """Merge settings into config.yaml (validated like the file itself), so later stages and reruns keep them."""

        def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
            for key, value in new.items():
                if isinstance(value, dict) and isinstance(into.get(key), dict):
                    merge(into[key], value)
                else:
                    into[key] = value

        raw = self.config().model_dump(mode="json")
        merge(raw, sections)
        cfg = SystemConfig.from_dict(raw, origin=origin)
        cfg.to_yaml(self.config_path)
        return cfg

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def partition_path(self) -> Path:
        return self.root / "partition.json"

    @property
    def generalist_path(self) -> Path:
        return self.root / "generalist.safetensors"

    @property
    def stage1_path(self) -> Path:
        """The shared all-class stage 1 that `init: shared` expert schedules start from."""
        return self.root / "stage1.safetensors"

    def backbone_path(self, preset: str) -> Path:
        return self.root / "backbones" / f"{preset}.safetensors"

    def resolve(self, path: str | Path) -> Path:
        """A path from the config: absolute, or relative to the system directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p

    def experts_dir(self, schedule: str) -> Path:
        """One folder per schedule, so static and progressive sets sit side by side."""
        return self.root / "experts" / schedule

    def expert_path(self, schedule: str, expert_id: str) -> Path:
        return self.experts_dir(schedule) / f"{expert_id}.safetensors"

    def onnx_path(self, runtime: str = "onnx") -> Path:
        """The exported generalist: `onnx` (float32) or `onnx-int8` (dynamic INT8)."""
        return self.root / ("generalist.int8.onnx" if runtime == "onnx-int8" else "generalist.onnx")

    @property
    def deferral_gate_path(self) -> Path:
        """The learned deferral gate, with the fingerprint of the models it was fitted on."""
        return self.root / "deferral_gate.json"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"
