"""The testbed's measurement pass: one test sample at a time, every piece timed.

For each sample the edge runs the generalist and routes, runs the routed expert
*locally* (edge execution), and asks the real server over the link (offload):
over an emulated link (root: namespace + tbf + relay/netem) or loopback. Both
answers go through the config's combination rule (`replies_answers`), as on the
live edge.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from askexpert.inference.http_backend import HttpExpertBackend
from askexpert.measure.netem import PEER_IP, DelayRelay, LinkUnavailable, NamespaceLink, can_emulate
from askexpert.models import load_checkpoint, predict_logits
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.progress import progress
from askexpert.protocol import OTHER, POOLED_RULES, softmax
from askexpert.protocol.backend import BackendError, add_call_info, replies_answers
from askexpert.routing import NO_SECOND, system_router
from askexpert.serving.process import ServerProcess
from askexpert.system import SystemDir
from askexpert.testbed.spec import EDGE_REPEATS, SampleMeasurement, TestbedSpec

T = TypeVar("T")


@dataclass
class Measurement:
    """A measurement pass: the samples and how the link was made."""

    rows: list[SampleMeasurement]
    labels: list[int]  # true labels, aligned with rows
    link_mode: str
    emulated: bool  # the network times were measured over an emulated link (else: link model added)
    edge_threads: int
    gate: str
    presets: dict[str, str] = field(default_factory=dict)  # role → preset, to match measured profiles
    rule: str = "replace"  # the combination rule every expert answer went through
    # forward passes per expert answer (2 with serving.test_time_flip): a profile's measured times are per pass
    expert_views: int = 1


def _best_of(repeats: int, fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    """(shortest wall time of `repeats` calls of fn(*args), the last call's result)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def _measure_samples(system: SystemDir, images: np.ndarray, url: str, threads: int) -> list[SampleMeasurement]:
    """Per sample: generalist, routing, local expert (edge execution), remote expert (offload)."""
    cfg = system.config()
    part = system.partition()
    rule = (cfg.routing.combine, cfg.routing.mix_weight)  # how every expert answer becomes the edge's
    router = system_router(system, part)
    classes = dict(zip(part.expert_ids, part.output_classes(), strict=True))
    generalist, _ = load_checkpoint(system.generalist_path)
    # edge execution: the served experts' answers (the mirror too) as an edge CPU computes them, in float32
    # (a Raspberry Pi has no bfloat16; at batch 1 it is slower than float32 on this one as well)
    local = LocalExpertBackend.of_system(system, cpu_bfloat16=False)
    remote = HttpExpertBackend(url, cfg.serving.model_copy(update={"retries": 0, "timeout_s": 30.0}))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[SampleMeasurement] = []
    try:
        # Warm-up, untimed: first calls pay for lazy initialisation (kernels, allocator, connection),
        # which would otherwise inflate the first measured samples and make reruns disagree.
        for _ in range(3):
            predict_logits(generalist, images[:1])
            for eid in part.expert_ids:
                local.predict(eid, images[:1])
                remote.predict(eid, images[:1])
        for i in progress(range(len(images)), desc="testbed", unit="sample", leave=False):
            img = images[i : i + 1]
            gen_s, logits = _best_of(EDGE_REPEATS, predict_logits, generalist, img)
            probs = softmax(logits)
            route_s, decision = _best_of(EDGE_REPEATS, router, probs)
            gen_s += route_s
            asked = [part.expert_ids[int(decision.expert[0])]]
            if int(decision.second[0]) != NO_SECOND:  # a close call asks the runner-up too: both are paid for
                asked.append(part.expert_ids[int(decision.second[0])])
            local_s, local_replies = 0.0, []
            for eid in asked:
                seconds, reply = _best_of(EDGE_REPEATS, local.predict, eid, img)
                local_s += seconds
                local_replies.append(reply)
            local_label = int(replies_answers(local_replies, [classes[e] for e in asked], probs, *rule)[0])
            t0 = time.perf_counter()
            error: str | None = None
            info: dict[str, float] = {}
            try:
                remote_replies = [remote.predict(eid, img) for eid in asked]
                for reply in remote_replies:  # sequential calls: their times, bytes and joules add up
                    info = add_call_info(info, reply.info)
                remote_label = int(replies_answers(remote_replies, [classes[e] for e in asked], probs, *rule)[0])
            except BackendError as exc:
                remote_label, error = OTHER, str(exc)
            offload_s = time.perf_counter() - t0
            eid = "+".join(asked)
            rows.append(
                SampleMeasurement.from_dict(
                    {
                        "id": i,
                        "gen_label": int(probs.argmax()),
                        "stat": float(decision.stat[0]),
                        "expert": eid,
                        "local_label": local_label,
                        "remote_label": remote_label,
                        "gen_s": gen_s,
                        "local_expert_s": local_s,
                        "offload_s": offload_s,
                        "error": error,
                        "requests": float(len(asked)),
                        **info,
                    }
                )
            )
    finally:
        torch.set_num_threads(previous_threads)
        remote.close()
    return rows


def measure(system: SystemDir, spec: TestbedSpec, samples: int, emulate: str = "auto") -> Measurement:
    """Run the measurement pass; returns per-sample rows and how the link was made."""
    cfg = system.config()
    test = system.splits().test
    n = min(samples, len(test))
    images, labels = test.images[:n], test.labels[:n]
    threads = spec.edge.threads_here()
    reason = can_emulate()
    if emulate == "on" and reason:
        raise LinkUnavailable(f"--emulate on, but {reason}")
    use_ns = emulate != "off" and reason is None
    # one sample at a time: a batching wait would only add latency; and torch, whatever `auto` would pick: the
    # profiles' slowdowns scale this machine's torch server, as they were set
    no_wait = ("--max-wait-ms", "0", "--set", "model_runtime=torch")
    # The server shares this machine's cores with the edge measurement. One batch-1 request at a
    # time runs fastest on one OpenMP thread, and one thread neither busy-waits on the edge's cores
    # nor pays a sleeping worker's wake-up on every op (measured here: a ~1.6 ms expert pass took
    # ~5 ms with two PASSIVE threads). serving.torch_threads, when set, still wins.
    quiet = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    if use_ns:
        with NamespaceLink(spec.link) as link:
            with ServerProcess(system.root, *no_wait, host=PEER_IP, prefix=link.exec_prefix(), env=quiet) as server:
                relay_delay = link.methods.get("delay") == "relay"
                p = spec.link
                with DelayRelay(
                    (PEER_IP, server.port),
                    p.rtt_ms if relay_delay else 0.0,
                    p.jitter_ms if relay_delay else 0.0,
                    p.loss if relay_delay else 0.0,
                ) as relay:
                    server.wait_ready(f"http://127.0.0.1:{relay.port}")
                    rows = _measure_samples(system, images, f"http://127.0.0.1:{relay.port}", threads)
            methods = link.methods
            mode = f"emulated: namespace + veth, rate by {methods['rate']}, delay/jitter/loss by {methods['delay']}"
    else:
        with ServerProcess(system.root, *no_wait, env=quiet) as server:
            rows = _measure_samples(system, images, server.wait_ready().url, threads)
        mode = "model: loopback + analytic link model" + (f" ({reason})" if reason else " (--emulate off)")
    cfg_models = {"generalist": cfg.generalist.preset, "expert": cfg.expert.preset}
    rule = cfg.routing.combine + (f" (w={cfg.routing.mix_weight:g})" if cfg.routing.combine in POOLED_RULES else "")
    rule += f", 2nd expert within {cfg.routing.second_within:g}" if cfg.routing.second_within > 0 else ""
    rule += ", experts averaged over each image and its mirror" if cfg.serving.test_time_flip else ""
    views = 2 if cfg.serving.test_time_flip else 1
    return Measurement(rows, labels.tolist(), mode, use_ns, threads, cfg.routing.gate, cfg_models, rule, views)
