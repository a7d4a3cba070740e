"""`askexpert evaluate`: cache once, choose on validation, report the test split once.

Every choice (gate, τ, k, combination rule) is made per schedule on the
validation split's cached outputs; the test split's cache is only read to
report the chosen points, next to the config's own operating point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from askexpert.config import RoutingConfig
from askexpert.errors import ConfigError
from askexpert.evaluate.cache import LogitCache, build_cache, build_stage1_logits
from askexpert.evaluate.gates import learned_stats
from askexpert.evaluate.metrics import (
    GateStats,
    choose_point,
    expert_labels,
    expert_table,
    fixes_and_breaks,
    gate_comparison,
    headline,
    offload_masks,
    outcomes,
    point_outcome,
    point_second,
    routed_experts,
    sweep,
)
from askexpert.evaluate.report import write_report
from askexpert.models import read_meta
from askexpert.protocol import POOLED_RULES
from askexpert.system import SystemDir


def _operating_rows(cache: LogitCache, point: RoutingConfig, ks: list[int], stats: GateStats) -> list[dict[str, Any]]:
    """The config's gate, τ and combination rule at every k."""
    rows = []
    answers = {s: expert_labels(cache, o, point.combine, point.mix_weight) for s, o in cache.schedules.items()}
    for k in ks:
        chosen = routed_experts(cache, k, point.scoring)
        for schedule, outputs in cache.schedules.items():
            mask = offload_masks(stats(point.gate, schedule, k), point.gate, np.asarray([point.tau]))
            second = point_second(cache, outputs, point.updated(top_k=k))
            res = outcomes(cache, outputs, mask, chosen, answers[schedule], second)
            row: dict[str, Any] = {"schedule": schedule, "k": k}
            row.update({name: float(v[0]) for name, v in res.items() if name != "load"})
            row.update({f"load_{e}": float(res["load"][0, i]) for i, e in enumerate(cache.partition.expert_ids)})
            rows.append(row)
    return rows


def choose_on_validation(
    system: SystemDir, test: LogitCache, val: LogitCache, test_stats: GateStats, val_stats: GateStats
) -> tuple[dict[str, RoutingConfig], list[dict[str, Any]]]:
    """Per schedule: the best point under each combination rule, with one expert and with a second one where
    it is close (on validation), and the overall choice.

    Every gate in `val_stats` competes (the learned one with its out-of-fold scores)."""
    cfg = system.config()
    taus = np.linspace(0.0, 1.0, cfg.evaluate.taus)
    ks = evaluated_ks(system, test)
    rule_sets = {"replace": [("replace", 0.0)]} | {
        pool: [(pool, float(w)) for w in cfg.evaluate.mix_weights] for pool in POOLED_RULES
    }
    pairs = tuple(float(w) for w in cfg.evaluate.second_withins if w > 0)
    families: list[tuple[str, list[tuple[str, float]], tuple[float, ...]]]
    families = [(name, rules, (0.0,)) for name, rules in rule_sets.items()]
    families += [(f"{name} + 2nd expert", rules, pairs) for name, rules in rule_sets.items() if pairs]
    chosen: dict[str, RoutingConfig] = {}
    rows: list[dict[str, Any]] = []
    for schedule in test.schedules:
        best: tuple[float, RoutingConfig] | None = None
        for family, rules, withins in families:
            if not rules:
                continue
            point, val_acc = choose_point(
                val,
                val.schedules[schedule],
                taus,
                ks,
                rules,
                val_stats.gates,
                cfg.routing.scoring,
                val_stats,
                schedule,
                withins,
            )
            on_test = point_outcome(
                test, test.schedules[schedule], point, test_stats(point.gate, schedule, point.top_k)
            )
            rows.append(
                {
                    "schedule": schedule,
                    "rule": family,
                    "point": point.describe(),
                    "val_accuracy": val_acc,
                    "test_accuracy": on_test["accuracy"],
                    "test_offload_rate": on_test["offload_rate"],
                    "test_routing_hit_rate": on_test["routing_hit_rate"],
                }
            )
            if best is None or val_acc > best[0]:
                best = (val_acc, point)
        assert best is not None
        chosen[schedule] = best[1]
    return chosen, rows


def budgets(system: SystemDir, cache: LogitCache) -> list[dict[str, Any]]:
    """Training images per expert for each schedule: its own steps, plus stage 1 amortised or charged whole."""
    rows = []
    ids = cache.partition.expert_ids
    for schedule in cache.schedules:
        metas = [read_meta(system.expert_path(schedule, e)) for e in ids]
        own = float(np.mean([m.extra.get("steps", 0) * m.extra.get("batch_size", 0) for m in metas]))
        shared = 0.0
        # stage 1 is this schedule's cost when its experts start from it or learn from it (`distill`)
        specs = [m.extra.get("schedule") or {} for m in metas]
        uses_stage1 = any(s.get("init") == "shared" or "distill" in s for s in specs)  # distill: dumped when on
        if uses_stage1 and system.stage1_path.is_file():
            s1 = read_meta(system.stage1_path)
            shared = float(s1.extra.get("steps", 0) * s1.extra.get("batch_size", 0))
        rows.append(
            {
                "schedule": schedule,
                "own_images_per_expert": own,
                "stage1_images": shared,
                "per_expert_amortised": own + shared / len(ids),
                "per_expert_charged_whole": own + shared,
            }
        )
    return rows


def model_validation(system: SystemDir) -> dict[str, float | None]:
    """Validation accuracy of the all-class models: is stage 1 (the expert preset) stronger than the generalist?"""
    out: dict[str, float | None] = {}
    for name, path in (("generalist", system.generalist_path), ("stage1", system.stage1_path)):
        out[name] = read_meta(path).metrics.get("val_accuracy") if path.is_file() else None
    return out


def versus_static(
    experts: list[dict[str, Any]], head: list[dict[str, Any]], schedules: list[str]
) -> list[dict[str, Any]]:
    """Each schedule minus `static`: closed-set and open-set on the subsets, and the whole system."""
    if "static" not in schedules:
        return []

    def system_acc(schedule: str) -> float:
        rows = [r for r in head if r["schedule"] == schedule and r["system"].startswith("collaborative, chosen")]
        rows = rows or [r for r in head if r["schedule"] == schedule and r["system"].startswith("collaborative")]
        return float(rows[0]["accuracy"]) if rows else float("nan")

    out = []
    for schedule in schedules:
        if schedule == "static":
            continue
        out.append(
            {
                "schedule": schedule,
                "closed_set_subsets": float(np.nanmean([r[schedule] - r["static"] for r in experts])),
                "open_set_subsets": float(
                    np.nanmean([r[f"{schedule} open-set"] - r["static open-set"] for r in experts])
                ),
                "system": system_acc(schedule) - system_acc("static"),
            }
        )
    return out


def evaluated_ks(system: SystemDir, cache: LogitCache) -> list[int]:
    """The k values every sweep and choice tries (the config's own k among them: it validates top_k ≤ max_k)."""
    return list(range(1, min(system.config().evaluate.max_k, cache.gen_probs.shape[1]) + 1))


def summarise(
    system: SystemDir,
    cache: LogitCache,
    val: LogitCache | None = None,
    stats: tuple[GateStats, GateStats] | None = None,
    stage1: np.ndarray | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every table of the report. `stats`: (test, validation) gate statistics with the learned gate, when fitted;
    `stage1`: stage 1's logits on the test split, for its closed-set column in the experts' table."""
    cfg = system.config()
    rc = cfg.routing
    ks = evaluated_ks(system, cache)
    taus = np.linspace(0.0, 1.0, cfg.evaluate.taus)
    test_stats = stats[0] if stats else GateStats.of(cache)
    val_stats = stats[1] if stats else (GateStats.of(val) if val is not None else None)
    rows = sweep(cache, taus, ks, test_stats.gates, stats=test_stats)
    experts = expert_table(cache, stage1)
    schedules = list(cache.schedules)
    point = rc
    if point.gate not in test_stats.gates:
        raise ConfigError(f"routing.gate is {point.gate!r} but no such gate was fitted; run `askexpert evaluate`")
    chosen, rule_rows = (
        choose_on_validation(system, cache, val, test_stats, val_stats)
        if val is not None and val_stats is not None
        else ({}, [])
    )
    head = headline(cache, point, chosen, test_stats)
    vs = versus_static(experts, head, schedules)
    diff = next((r["closed_set_subsets"] for r in vs if r["schedule"] == "progressive"), None)
    by_k = _operating_rows(cache, point, ks, test_stats)
    gate_rows = []
    if val is not None and val_stats is not None:
        for schedule in schedules:
            k = chosen[schedule].top_k if schedule in chosen else rc.top_k
            for gate in test_stats.gates:
                gate_rows.append(
                    gate_comparison(
                        cache,
                        val,
                        test_stats(gate, schedule, k),
                        val_stats(gate, schedule, k),
                        gate,
                        schedule,
                        k,
                        rc.scoring,
                    )
                )
    collaboration = []
    for schedule in schedules:
        p = chosen.get(schedule, point)
        for split, c in (("val", val), ("test", cache)):
            if c is not None:
                collaboration += fixes_and_breaks(c, c.schedules[schedule], p, split, schedule)
    summary: dict[str, Any] = {
        "system": cfg.name,
        "test_samples": int(len(cache.labels)),
        "val_samples": int(len(val.labels)) if val is not None else 0,
        "num_classes": int(cache.gen_probs.shape[1]),
        "partition_strategy": cache.partition.strategy,
        "expert_ids": list(cache.partition.expert_ids),
        "schedules": schedules,
        "cache_key": cache.key,
        "operating_point": rc.model_dump(),
        "chosen_on_validation": {s: p.model_dump() for s, p in chosen.items()},
        "combination_rules": rule_rows,
        "headline": head,
        "experts": experts,
        "versus_static": vs,
        "budgets": budgets(system, cache),
        "collaboration": collaboration,
        "gates": gate_rows,
        "model_validation": model_validation(system),
        "progressive_minus_static": diff,
        "accuracy_vs_k": [{k: v for k, v in r.items() if not k.startswith("load_")} for r in by_k],
        "operating_rows": [r for r in by_k if r["k"] == rc.top_k],
    }
    return summary, rows


def apply_choice(system: SystemDir, summary: dict[str, Any]) -> dict[str, Any]:
    """Make the served schedule's validation-chosen point the config's routing operating point."""
    cfg = system.config()
    chosen = summary.get("chosen_on_validation", {}).get(cfg.serving.schedule)
    if chosen is None:
        raise ConfigError(f"no point was chosen on validation for the served schedule {cfg.serving.schedule!r}")
    return system.update_config("evaluate --apply", routing=dict(chosen)).routing.model_dump()


def evaluate_system(system: SystemDir) -> dict[str, Any]:
    """Build/reuse the caches, choose on validation, compute every table, write `report/`."""
    cfg = system.config()
    cache = build_cache(system)
    val = build_cache(system, list(cache.schedules), split="val") if cfg.evaluate.choose_on_validation else None
    stats = None
    if val is not None:
        ks = evaluated_ks(system, cache)
        test_stats, val_stats, gates = learned_stats(system, cache, val, ks, cfg.routing.scoring)
        stats = (test_stats, val_stats)
    summary, rows = summarise(system, cache, val, stats, build_stage1_logits(system))
    if val is not None:
        served = cfg.serving.schedule if cfg.serving.schedule in cache.schedules else next(iter(cache.schedules))
        chosen = summary["chosen_on_validation"].get(served)
        k = int(chosen["top_k"]) if chosen else cfg.routing.top_k
        gate = gates[(served, k)]
        gate.to_json(system.deferral_gate_path)  # what `gate: learned` routes with, at the chosen k
        summary["deferral_gate"] = {
            "path": str(system.deferral_gate_path),
            "schedule": served,
            "k": k,
            "form": gate.form,  # the one validation preferred (evaluate.gates)
        }
    summary["report"] = str(write_report(system.report_dir, summary, rows))
    return summary
