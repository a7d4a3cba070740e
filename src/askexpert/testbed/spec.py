"""What a testbed run is about (`TestbedSpec`) and what it measures per sample (`SampleMeasurement`).

Typed records between the testbed's three parts: `measurement` fills
`SampleMeasurement`s, `costs` turns them into per-strategy latency and energy,
`report` writes the tables, plots and provenance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from askexpert.measure.profiles import DeviceProfile, LinkPreset, RadioModel, load_device, load_link


@dataclass(frozen=True)
class TestbedSpec:
    edge: DeviceProfile
    near_edge: DeviceProfile
    link_name: str
    link: LinkPreset
    radio: RadioModel


def spec_from_names(edge: str, near_edge: str, link: str) -> TestbedSpec:
    preset, radio = load_link(link)
    return TestbedSpec(load_device(edge), load_device(near_edge), link, preset, radio)


EDGE_REPEATS = 3  # edge compute is timed as the best of this many runs: a shared host's hiccups are not the device's


@dataclass
class SampleMeasurement:
    """One test sample, measured: the edge's pieces and the offload over the link.

    Times in seconds (`*_s`) or milliseconds (`*_ms`, as the HTTP backend reports them).
    `error` is set when the offload failed; `offload_s` is then the time the failure took.
    """

    id: int
    gen_label: int
    stat: float  # the gate's statistic
    expert: str
    local_label: int  # the routed expert run on the edge (edge execution)
    remote_label: int  # the same expert asked over the link (OTHER when it failed)
    gen_s: float  # generalist + router on this machine (best of EDGE_REPEATS)
    local_expert_s: float
    offload_s: float  # wall time of the remote call, success or failure
    error: str | None = None
    bytes_sent: float = 0.0
    bytes_received: float = 0.0
    encode_ms: float = 0.0
    rtt_ms: float = 0.0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: float = 1.0
    retries: float = 0.0
    requests: float = 1.0  # experts asked (2: the runner-up too); times, bytes and joules are their sums
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The server answered (an abstention counts as an answer)."""
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> SampleMeasurement:
        known = set(cls.__dataclass_fields__) - {"extra"}
        return cls(
            **{k: v for k, v in row.items() if k in known}, extra={k: v for k, v in row.items() if k not in known}
        )
