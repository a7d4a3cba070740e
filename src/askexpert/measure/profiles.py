"""Device and link profiles: power and speed figures as data, each with its source.

Profiles ship as YAML under `askexpert/measure/profiles/`; a path to a YAML file of
the same shape works anywhere a name does, so users can add their own hardware.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from askexpert.errors import ConfigError


class MeasuredTimes(BaseModel):
    """Forward-pass times measured on the device itself (`askexpert profile measure`)."""

    model_config = ConfigDict(extra="forbid")
    presets: dict[str, str]  # role ("generalist", "expert") → preset the times belong to
    image_size: int = Field(ge=1)
    device: str
    date: str
    ms: dict[str, dict[int, float]]  # role → batch size → median milliseconds per batch
    j: dict[str, dict[int, float]] | None = None  # role → batch size → joules per batch, where a meter read them
    meter: str | None = None  # which meter: nvml (GPU), rapl (CPU package)

    def per_image_ms(self, role: str, preset: str, batch: int) -> float | None:
        """Milliseconds per image for `role` at the largest measured batch ≤ `batch` (None: not measured)."""
        return self._per_image(self.ms, role, preset, batch)

    def per_image_j(self, role: str, preset: str, batch: int) -> float | None:
        """Metered joules per image at the largest measured batch ≤ `batch` (None: not metered)."""
        return self._per_image(self.j or {}, role, preset, batch)

    def _per_image(self, table: dict[str, dict[int, float]], role: str, preset: str, batch: int) -> float | None:
        """A per-batch figure divided by its batch, only for the preset it was measured with."""
        if self.presets.get(role) != preset or role not in table:
            return None
        sizes = [b for b in table[role] if b <= max(1, batch)]
        return table[role][max(sizes)] / max(sizes) if sizes else None


class DeviceProfile(BaseModel):
    """A device's power draw and its speed: measured times where it has them, else a slowdown guess."""

    model_config = ConfigDict(extra="forbid")
    name: str
    tier: Literal["edge", "near-edge"]
    idle_w: float = Field(ge=0.0)
    active_w: float = Field(gt=0.0)
    threads: int = Field(ge=1)
    slowdown: float = Field(gt=0.0)  # compute time there = measured here × slowdown (where not measured)
    sources: list[str] = Field(min_length=1)
    measured: MeasuredTimes | None = None
    host: bool = False  # describes the machine askexpert runs on: the testbed's server meters it directly

    def threads_here(self) -> int:
        """The profile's thread count, capped at the threads torch may use on this machine."""
        import torch

        return max(1, min(self.threads, torch.get_num_threads()))


class RadioModel(BaseModel):
    """P = alpha_up·up_Mbps + alpha_down·down_Mbps + beta (mW) while the radio transfers."""

    model_config = ConfigDict(extra="forbid")
    alpha_up_mw_per_mbps: float = Field(ge=0.0)
    alpha_down_mw_per_mbps: float = Field(ge=0.0)
    beta_mw: float = Field(ge=0.0)


class LinkPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    up_mbps: float = Field(gt=0.0)
    down_mbps: float = Field(gt=0.0)
    rtt_ms: float = Field(ge=0.0)
    jitter_ms: float = Field(0.0, ge=0.0)
    loss: float = Field(0.0, ge=0.0, lt=1.0)
    radio: str = "none"


class LinkCatalogue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    links: dict[str, LinkPreset]
    radios: dict[str, RadioModel]


def _read_yaml(path: Path | str, text: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _builtin(name: str) -> tuple[str, str] | None:
    entry = resources.files("askexpert.measure").joinpath("profiles", f"{name}.yaml")
    return (str(entry), entry.read_text()) if entry.is_file() else None


def builtin_devices() -> list[str]:
    folder = resources.files("askexpert.measure").joinpath("profiles")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and p.name != "links.yaml")


def load_device(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        origin, text = str(path), path.read_text()
    else:
        found = _builtin(name_or_path)
        if found is None:
            raise ConfigError(f"unknown device profile {name_or_path!r}; built-in: {', '.join(builtin_devices())}")
        origin, text = found
    try:
        return DeviceProfile.model_validate(_read_yaml(origin, text))
    except ValidationError as exc:
        raise ConfigError(
            f"{origin}: invalid device profile: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        ) from None


def link_catalogue() -> LinkCatalogue:
    found = _builtin("links")
    assert found is not None
    return LinkCatalogue.model_validate(_read_yaml(*found))


def load_link(name: str) -> tuple[LinkPreset, RadioModel]:
    catalogue = link_catalogue()
    if name not in catalogue.links:
        raise ConfigError(f"unknown link preset {name!r}; known: {', '.join(catalogue.links)}")
    preset = catalogue.links[name]
    return preset, catalogue.radios[preset.radio]
