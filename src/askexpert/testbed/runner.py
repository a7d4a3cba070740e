"""`askexpert testbed`: edge-only, edge execution, near-edge only and collaborative, side by side.

One pass over the same samples, one image at a time (an edge camera's view), in
three parts with typed records between them (`testbed.spec`):
`measurement` times every piece of every sample (generalist, the routed expert
run on the edge, the same expert asked over the link); `costs` turns them into
each strategy's latency and energy at every τ, so all strategies are compared on
identical samples and network conditions (the headline τ is chosen beforehand on
the validation split, `choice`); `report` writes the tables, plots and
the provenance of every number (measured here, measured on the device, or modelled).
"""

from __future__ import annotations

from typing import Any

from askexpert.system import SystemDir
from askexpert.testbed.choice import ValidationView, parity_tau
from askexpert.testbed.costs import TABLE_COLUMNS, compute_sources, headline_ratios, strategies
from askexpert.testbed.measurement import Measurement, measure
from askexpert.testbed.report import write_testbed_report
from askexpert.testbed.spec import SampleMeasurement, TestbedSpec, spec_from_names

DEFAULT_TAU_POINTS = 11  # τ values at validation offload rates 0, 0.1, …, 1 (plus the headline's τ)

__all__ = [
    "TABLE_COLUMNS",
    "Measurement",
    "SampleMeasurement",
    "TestbedSpec",
    "compute_sources",
    "run_testbed",
    "spec_from_names",
    "strategies",
]


def run_testbed(
    system: SystemDir,
    spec: TestbedSpec,
    samples: int = 500,
    taus: list[float] | None = None,
    emulate: str = "auto",
) -> dict[str, Any]:
    """Measure, cost every strategy, and write `DIR/testbed/`; returns the summary."""
    cfg = system.config()
    view = ValidationView.of(system)  # every choice on the validation split; the test samples only report
    choice = parity_tau(view, cfg.routing.top_k)
    grid = taus if taus is not None else view.spanning_taus(DEFAULT_TAU_POINTS).tolist()
    grid = sorted({*grid, choice["tau"]})
    run = measure(system, spec, samples, emulate)
    table, records = strategies(run, spec, grid)
    out = system.root / "testbed"
    return write_testbed_report(
        out, cfg.name, cfg.routing.model_dump(), spec, run, table, records, headline_ratios(table, records, choice)
    )
