"""Energy per sample: measured where a meter exists, modelled from profiles otherwise.

Meters (one interface, `EnergyMeter`):
* `RaplMeter`: Intel/AMD RAPL through /sys/class/powercap (needs read access);
* `NvmlMeter`: an NVIDIA GPU's total-energy counter through NVML (nvidia-ml-py);
* `PowerModel`: a device profile's active/idle watts × time, for hardware that
  cannot be metered here.

`account` splits a sample's energy into edge compute, radio and near-edge compute,
and says for each part whether it was measured or modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from askexpert.measure.link import LinkModel
from askexpert.measure.profiles import DeviceProfile, RadioModel

POWERCAP = Path("/sys/class/powercap")


class EnergyMeter(Protocol):
    source: str

    def read_j(self) -> float:
        """A monotonically increasing energy counter in joules."""
        ...


class RaplMeter:
    source = "rapl"

    def __init__(self, root: Path = POWERCAP) -> None:
        self.zones = sorted(p for p in root.glob("intel-rapl:*") if ":" in p.name and p.name.count(":") == 1)
        if not self.zones:
            raise OSError(f"no RAPL package zones under {root}")
        self.files = [z / "energy_uj" for z in self.zones]
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self.last = [int(f.read_text()) for f in self.files]  # raises PermissionError when unreadable
        self.total_uj = 0

    def read_j(self) -> float:
        for i, f in enumerate(self.files):
            now = int(f.read_text())
            delta = now - self.last[i]
            self.total_uj += delta if delta >= 0 else delta + self.ranges[i]  # counter wrapped
            self.last[i] = now
        return self.total_uj / 1e6


class NvmlMeter:
    source = "nvml"

    def __init__(self, index: int = 0) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)  # raises where unsupported

    def read_j(self) -> float:
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1e3  # mJ -> J


def available_meters() -> dict[str, EnergyMeter]:
    """The hardware meters this machine offers (empty where none is readable)."""
    meters: dict[str, EnergyMeter] = {}
    try:
        meters["rapl"] = RaplMeter()
    except (OSError, ValueError):
        pass
    try:
        meters["nvml"] = NvmlMeter()
    except Exception:  # noqa: BLE001 - no library, no driver, no GPU, or no energy counter
        pass
    return meters


def meter_for(device: str) -> EnergyMeter | None:
    """The meter that sees the work on `device`: NVML for a CUDA GPU, RAPL for the CPU; None where unreadable."""
    meters = available_meters()
    return meters.get("nvml") if device.startswith("cuda") else meters.get("rapl")


@dataclass(frozen=True)
class PowerModel:
    """Energy from a device profile: active watts while computing, idle watts while waiting."""

    profile: DeviceProfile
    source: str = "model"

    def compute_j(self, seconds: float) -> float:
        return self.profile.active_w * seconds

    def idle_j(self, seconds: float) -> float:
        return self.profile.idle_w * seconds


def radio_j(radio: RadioModel, link: LinkModel, up_bytes: float, down_bytes: float) -> float:
    """Radio energy for one request/response, Huang et al.'s linear power model × transfer time."""
    up_s, down_s = link.uplink_s(up_bytes), link.downlink_s(down_bytes)
    p = link.preset
    up_w = (radio.alpha_up_mw_per_mbps * p.up_mbps + radio.beta_mw) / 1e3
    down_w = (radio.alpha_down_mw_per_mbps * p.down_mbps + radio.beta_mw) / 1e3
    return up_w * up_s + down_w * down_s


@dataclass(frozen=True)
class SampleEnergy:
    edge_compute_j: float
    edge_wait_j: float
    radio_j: float
    near_edge_j: float
    measured: tuple[str, ...] = ()  # which parts came from a hardware meter

    @property
    def edge_j(self) -> float:
        return self.edge_compute_j + self.edge_wait_j

    @property
    def total_j(self) -> float:
        return self.edge_compute_j + self.edge_wait_j + self.radio_j + self.near_edge_j


def account(
    edge: PowerModel,
    near_edge: PowerModel,
    radio: RadioModel,
    link: LinkModel,
    edge_compute_s: float,
    wait_s: float,
    up_bytes: float,
    down_bytes: float,
    near_edge_compute_s: float,
    near_edge_measured_j: float | None = None,
) -> SampleEnergy:
    """One sample's energy: edge active while computing and idle while waiting, radio while
    transferring, near-edge active for this sample's share of its batch (or, where a meter
    measured the near-edge device, `near_edge_measured_j`)."""
    return SampleEnergy(
        edge.compute_j(edge_compute_s),
        edge.idle_j(wait_s),
        radio_j(radio, link, up_bytes, down_bytes) if up_bytes or down_bytes else 0.0,
        near_edge.compute_j(near_edge_compute_s) if near_edge_measured_j is None else near_edge_measured_j,
        ("near_edge",) if near_edge_measured_j is not None else (),
    )
