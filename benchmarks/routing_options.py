"""Benchmark: which routing finds the right expert, and does it pay? (issue 15, "routing that finds the right expert").

    .venv/bin/python benchmarks/routing_options.py --system runs/cifar100-v4/seed0 [--gate margin] [--ks 1,3]

Two tables from a system's cached outputs (validation and test; `askexpert evaluate` builds them):

1. Routers at one request per offloaded sample: Top-1 and Top-k votes (today's router),
   subset probability mass, and a learned router (a logistic regression from the
   generalist's log-probabilities and subset masses to the expert holding the true
   class, fitted on the validation split). The gate offloads the least confident
   `--budgets` shares; the test split reports accuracy and hit rate.
2. A second expert on close calls: an offloaded sample whose two best experts' Top-k
scores lie within δ is sent to both experts,
and costs two requests. Two answers become one as the live edge's combination rule says
(`askexpert.protocol.pair_answer`): `replace` takes the more confident answer that is not
"other"; `mix` / `logmix` average the two experts' full distributions (each one's "other"
spread by the generalist; arithmetically / geometrically) before pooling with the
generalist. (The live edge's own window, `routing.second_within`, is a share of the best
score; this probe's δ is an absolute gap.) For each request budget (requests per sample), τ is set on validation to
spend it, δ is chosen on validation among `--deltas` (δ = 0: one expert), and
the test split reports accuracy and the routing hit rate (offloaded samples whose asked
experts include the one holding the true class).
3. Partitions that serve the router, by hit rate alone (their experts are not trained here):
   today's confusion clustering, the same clustering of the generalist's top-2
   co-occurrence counts, and of both together, all from the validation split; and
   today's partition with 2 and 4 overlapping classes per expert (`partition.overlap`).
Writes `DIR/report/routing_options.md` and `DIR/report/{routers,second_expert,partitions}.{csv,json}`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from askexpert.evaluate.cache import LogitCache, build_cache
from askexpert.evaluate.report import markdown_table, write_csv
from askexpert.partition import Partition, confusion_partition, with_overlap
from askexpert.protocol import COMBINE_RULES, OTHER, expert_answer, pair_answer, softmax
from askexpert.routing import choose_expert, expert_scores, gate_offloads, uncertainty
from askexpert.system import SystemDir


class Outputs:
    """One split's routing facts and every expert's answers, computed once."""

    def __init__(self, cache: LogitCache, schedule: str, gate: str, k: int) -> None:
        part, n = cache.partition, len(cache.labels)
        self.labels, self.gen = cache.labels, cache.gen_probs
        self.stat = uncertainty(self.gen, gate)
        scores, best_rank = expert_scores(self.gen, part.membership(), k)
        # the router's choice (ties to the best-ranked Top-k class), then the runner-up
        key = scores - 1e-9 * best_rank
        order = np.argsort(-key, axis=1, kind="stable")
        self.first, self.second = order[:, 0], order[:, 1]
        rows = np.arange(n)
        self.gap = scores[rows, self.first] - scores[rows, self.second]
        outputs = cache.schedules[schedule]
        self.probs = [softmax(outputs.logits[e]) for e in part.expert_ids]
        self.classes = part.output_classes()
        self.owner = part.membership()[:, self.labels].argmax(axis=0)
        self._answers: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}

    def answers(self, rule: str, weight: float) -> tuple[np.ndarray, np.ndarray]:
        """(the first expert's answer, the two experts' answer) per sample under a rule, by the protocol's
        own functions (`expert_answer`, `pair_answer`): the live edge's rules, computed once per rule."""
        if (rule, weight) not in self._answers:
            single = np.empty(len(self.labels), dtype=np.int64)
            both = np.empty(len(self.labels), dtype=np.int64)
            for a, b in {(int(a), int(b)) for a, b in zip(self.first, self.second, strict=True)}:
                rows = np.flatnonzero((self.first == a) & (self.second == b))
                gen, pa, pb = self.gen[rows], self.probs[a][rows], self.probs[b][rows]
                single[rows] = expert_answer(pa, self.classes[a], gen, rule, weight)
                both[rows] = pair_answer((pa, pb), (self.classes[a], self.classes[b]), gen, rule, weight)
            self._answers[(rule, weight)] = (single, both)
        return self._answers[(rule, weight)]

    def run(self, gate: str, tau: float, delta: float, rule: str, weight: float) -> dict[str, float]:
        n = len(self.labels)
        offload = gate_offloads(self.stat, gate, tau)
        two = offload & (self.gap < delta)
        e1, e2 = self.first, self.second
        single, both = self.answers(rule, weight)
        asked = np.where(two, both, single)
        final = np.where(offload & (asked != OTHER), asked, self.gen.argmax(axis=1))
        hit = (e1 == self.owner) | (two & (e2 == self.owner))
        return {
            "accuracy": float((final == self.labels).mean()),
            "requests": float((offload.sum() + two.sum()) / n),
            "second_share": float(two.sum() / max(1, offload.sum())),
            "hit_rate": float(hit[offload].mean()) if offload.any() else float("nan"),
        }

    def tau_for(self, gate: str, budget: float, delta: float) -> float:
        """The τ whose requests per sample come closest to `budget` from below (bisection on this split)."""
        lo, hi = float(self.stat.min()) - 1e-6, float(self.stat.max()) + 1e-6
        below = gate in ("max_prob", "margin")  # offload below τ: more τ, more requests
        for _ in range(40):
            mid = (lo + hi) / 2
            spent = self.run(gate, mid, delta, "replace", 0.0)["requests"]
            if (spent <= budget) == below:
                lo = mid
            else:
                hi = mid
        return lo if below else hi


def router_rows(
    val: LogitCache, test: LogitCache, schedule: str, gate: str, ks: list[int], budgets: list[float]
) -> list[dict[str, Any]]:
    """Table 1: hit rate and accuracy of each router, at the same gate and budget (one request per offload)."""
    from sklearn.linear_model import LogisticRegression

    membership = val.partition.membership()

    def features(cache: LogitCache) -> np.ndarray:
        mass = cache.gen_probs @ membership.T.astype(np.float64)
        return np.concatenate([np.log(np.clip(cache.gen_probs, 1e-8, 1.0)), mass], axis=1)

    def owner(cache: LogitCache) -> np.ndarray:
        return membership[:, cache.labels].argmax(axis=0)

    learned = LogisticRegression(max_iter=2000).fit(features(val), owner(val))
    routers = {f"top-{k} votes": choose_expert(test.gen_probs, membership, k) for k in ks}
    routers["subset mass"] = (test.gen_probs @ membership.T.astype(np.float64)).argmax(axis=1)
    routers["learned (fitted on val)"] = learned.predict(features(test))
    stat, rows_n = uncertainty(test.gen_probs, gate), np.arange(len(test.labels))
    answers = test.schedules[schedule].labels
    rows = []
    for budget in budgets:
        offload = gate_offloads(stat, gate, float(np.quantile(stat, budget if gate != "entropy" else 1 - budget)))
        for name, route in routers.items():
            asked = answers[route, rows_n]
            final = np.where(offload & (asked != OTHER), asked, test.gen_probs.argmax(axis=1))
            rows.append(
                {
                    "router": name,
                    "offload": float(offload.mean()),
                    "test_accuracy": float((final == test.labels).mean()),
                    "hit_rate": float((route == owner(test))[offload].mean()),
                }
            )
    return rows


def partition_rows(
    val: LogitCache, test: LogitCache, gate: str, ks: list[int], budget: float, overlaps: tuple[int, ...] = (2, 4)
) -> list[dict[str, Any]]:
    """Table 3: the routing hit rate each partition would give (at `budget` offload and over all samples)."""
    current = val.partition
    num_classes = val.gen_probs.shape[1]
    order = np.argsort(-val.gen_probs, axis=1, kind="stable")
    pairs = np.zeros((num_classes, num_classes))
    np.add.at(pairs, (order[:, 0], order[:, 1]), 1.0)
    pairs += pairs.T
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (val.labels, order[:, 0]), 1.0)
    candidates: dict[str, Partition] = {
        f"current ({current.strategy})": current,
        "top-2 co-occurrence": confusion_partition(pairs, current.num_experts),
        "confusion + co-occurrence": confusion_partition(
            confusion / confusion.sum() + pairs / pairs.sum(), current.num_experts
        ),
    }
    if current.strategy == "confusion" and not current.stats.get("overlap"):
        for extra in overlaps:
            candidates[f"current, overlap {extra}"] = with_overlap(current, confusion, extra)
    rows = []
    for name, part in candidates.items():
        membership = part.membership()
        row: dict[str, Any] = {"partition": name}
        for split, cache in (("val", val), ("test", test)):
            stat = uncertainty(cache.gen_probs, gate)
            offload = gate_offloads(stat, gate, float(np.quantile(stat, budget if gate != "entropy" else 1 - budget)))
            for k in ks:
                hit = membership[choose_expert(cache.gen_probs, membership, k), cache.labels]  # overlap-safe
                row[f"{split} hit k={k} at {budget:g}"] = float(hit[offload].mean())
                row[f"{split} hit k={k} all"] = float(hit.mean())
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", required=True)
    ap.add_argument("--schedule", default=None, help="default: serving.schedule")
    ap.add_argument("--gate", default="margin", choices=["max_prob", "margin", "entropy"])
    ap.add_argument("--ks", default="1,3")
    ap.add_argument("--budgets", default="0.1,0.2,0.3,0.4,0.5", help="requests per sample")
    ap.add_argument("--deltas", default="0,0.05,0.1,0.2,0.3,1.01")
    ap.add_argument("--rules", default="replace,mix:0.3,mix:0.5")
    args = ap.parse_args()
    for spec in args.rules.split(","):
        if spec.partition(":")[0] not in COMBINE_RULES:
            ap.error(f"--rules: {spec!r} is not a combination rule (replace, mix:W or logmix:W)")
    system = SystemDir.open(args.system)
    schedule = args.schedule or system.config().serving.schedule
    val_cache = build_cache(system, [schedule], split="val")
    test_cache = build_cache(system, [schedule])
    deltas = [float(d) for d in args.deltas.split(",")]
    rows: list[dict[str, Any]] = []
    for k in (int(x) for x in args.ks.split(",")):
        val, test = Outputs(val_cache, schedule, args.gate, k), Outputs(test_cache, schedule, args.gate, k)
        for spec in args.rules.split(","):
            rule, _, w = spec.partition(":")
            weight = float(w or 0.0)
            for budget in (float(b) for b in args.budgets.split(",")):
                taus = {d: val.tau_for(args.gate, budget, d) for d in deltas}
                scored = {d: val.run(args.gate, taus[d], d, rule, weight)["accuracy"] for d in deltas}
                best = max(deltas, key=lambda d: (scored[d], -d))  # ties: the cheaper path
                one = test.run(args.gate, taus[0.0], 0.0, rule, weight)
                chosen = test.run(args.gate, taus[best], best, rule, weight)
                rows.append(
                    {
                        "k": k,
                        "rule": spec,
                        "budget": budget,
                        "delta_chosen_on_val": best,
                        "val_gain": scored[best] - scored[0.0],
                        "test_one_expert": one["accuracy"],
                        "test_chosen": chosen["accuracy"],
                        "test_gain": chosen["accuracy"] - one["accuracy"],
                        "test_requests": chosen["requests"],
                        "test_second_share": chosen["second_share"],
                        "hit_rate_one": one["hit_rate"],
                        "hit_rate_chosen": chosen["hit_rate"],
                        "hit_rate_both_always": test.run(args.gate, taus[max(deltas)], max(deltas), rule, weight)[
                            "hit_rate"
                        ],
                    }
                )
    budgets = [float(b) for b in args.budgets.split(",")]
    routers = router_rows(val_cache, test_cache, schedule, args.gate, [int(x) for x in args.ks.split(",")], budgets)
    ks = [int(x) for x in args.ks.split(",")]
    partitions = partition_rows(val_cache, test_cache, args.gate, ks, 0.3)
    out = system.report_dir
    out.mkdir(parents=True, exist_ok=True)
    for name, table_rows in (("routers", routers), ("second_expert", rows), ("partitions", partitions)):
        write_csv(out / f"{name}.csv", table_rows)
        (out / f"{name}.json").write_text(json.dumps(table_rows, indent=1))
    text = (
        f"# Routing options ({schedule}, {args.gate} gate)\n\n## Routers, one request per offload\n\n"
        f"{markdown_table(routers)}\n\n## A second expert on close calls\n\n{markdown_table(rows)}\n\n"
        f"## Partitions, by routing hit rate (experts not retrained)\n\n{markdown_table(partitions)}\n"
    )
    (out / "routing_options.md").write_text(text)
    print(text)
    gains = np.asarray([r["test_gain"] for r in rows])
    print(f"test gain of the validation-chosen δ over one expert: mean {gains.mean():+.4f}, max {gains.max():+.4f}")
    print(f"wrote {out / 'routing_options.md'}")


if __name__ == "__main__":
    main()
