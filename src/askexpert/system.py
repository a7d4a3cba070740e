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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from askexpert.config import SystemConfig
from askexpert.errors import ConfigError


@dataclass(frozen=True)
class SystemDir:
    root: Path

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

    def config(self) -> SystemConfig:
        return SystemConfig.from_yaml(self.config_path)

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
