"""The same expert server on Ray Serve, for a near-edge tier of several GPUs or nodes.

One Ray Serve application per expert (`askexpert-<id>`, its deployment
`expert-<id>`), batching with `@serve.batch`, with `serving.ray_replicas`
replicas each. The HTTP front is the plain engine's own: the very same FastAPI
app (`create_app`) under uvicorn in this process, whose `RayExpertService`
forwards each admitted request to its expert through a deployment handle. Ray's
HTTP proxy is not started: it and an ingress replica behind it added two
processes and two hops to every request, refused ones included (2-core box:
capacity 45-56 requests/s with them, 80-90 without; at 4x load 0.53-0.84 of it
kept, now 0.89-1.03; docs/serving-log.md, "Ray's front"). So the promises
live in one place for both engines: admission and shedding
(`serving.admission`, before the body is read), the caller's deadline (a
replica drops a call whose deadline passed before its batch starts: 504) and
energy metering (read around every model call in the replica). What differs:
the batching itself is Ray's, and the throughput the wait estimate divides by
is measured per expert, not per replica. Ray is an optional dependency
(`pip install askexpert[ray]`); this module is imported only for
`askexpert serve --engine ray`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve import RunTarget

from askexpert.config import ResolvedServing
from askexpert.data import input_size
from askexpert.errors import ConfigError
from askexpert.measure.energy import meter_for
from askexpert.models import CheckpointMeta, load_checkpoint, predict_logits, read_meta
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.models.onnx_runtime import OnnxGeneralist
from askexpert.models.predict import bfloat16_honoured, cpu_bfloat16_usable
from askexpert.protocol.http import PredictReply
from askexpert.serving.batching import BatchResult, DeadlineExpired, EnergyShares, timed_metered
from askexpert.serving.onnx_experts import OnnxExperts, export_experts
from askexpert.serving.server import ServiceBase, create_app, serve_http
from askexpert.system import SystemDir

APP_PREFIX = "askexpert-"  # each expert's Ray Serve application: askexpert-<id>


# One call to an expert replica: the images, when the HTTP front sent them and the caller's
# deadline (both wall-clock `time.time()`, as the replica may run in another process or node).
Call = tuple[np.ndarray, float, float | None]


def _images_in(calls: list[Call]) -> int:
    """Batch size in images, not calls, so `serving.max_batch_size` means the same on both engines."""
    return sum(len(images) for images, _, _ in calls)


class ExpertReplica:
    """One expert's model; each call carries one image batch, Ray merges concurrent calls."""

    def __init__(
        self,
        weights: str,
        max_batch_size: int,
        max_wait_ms: float,
        torch_threads: int,
        device: str,
        *,
        flip: bool,
        cpu_bfloat16: bool,
        onnx_path: str | None = None,
    ) -> None:
        """`onnx_path`: the expert exported to ONNX (`serving.model_runtime: onnx`, exported by the front before
        deploying: one writer), run by ONNX Runtime instead of torch, on `torch_threads` threads or else one:
        its threads spin between calls, and every expert's replica shares the host (two threads each: the
        replicas took both cores of a 2-core box, capacity 30 against 85 requests/s on one)."""
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = device
        self.flip = flip  # serving.test_time_flip and .cpu_bfloat16, as the plain engine's LocalExpertBackend
        self.cpu_bfloat16 = cpu_bfloat16_usable(cpu_bfloat16, torch.device(device))
        self.onnx = None
        if onnx_path is not None:  # the torch model is not loaded: the export is what runs
            self.onnx = OnnxExperts({"expert": OnnxGeneralist(onnx_path, torch_threads or 1)}, flip)
        else:
            self.model, _ = load_checkpoint(weights, device)
        self.meter = meter_for(device)  # NVML on a GPU, RAPL on a CPU, where readable (as the plain engine)
        self.shares = EnergyShares(self.meter) if self.meter is not None else None
        # the model call runs off the replica's event loop, which meanwhile takes in the next batch's calls
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="askexpert-replica")
        self.__call__.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.__call__.set_batch_wait_timeout_s(max_wait_ms / 1000.0)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def __call__(self, calls: list[Call]) -> list[BatchResult | DeadlineExpired]:
        started = time.time()
        out: list[BatchResult | DeadlineExpired | None] = [None] * len(calls)
        live = []
        for i, (_, sent_at, deadline) in enumerate(calls):
            if deadline is not None and started > deadline:  # the caller has given up: do not compute it
                out[i] = DeadlineExpired(f"the caller's budget ran out after {started - sent_at:.3f} s")
            else:
                live.append(i)
        if live:
            merged = np.concatenate([calls[i][0] for i in live]) if len(live) > 1 else calls[live[0]][0]
            loop = asyncio.get_running_loop()
            logits, joules, _, compute = await loop.run_in_executor(
                self.executor, timed_metered, self.shares, self.logits, merged
            )
            source = self.meter.source if self.meter is not None else None
            offset = 0
            for i in live:
                images, sent_at, _ = calls[i]
                rows = logits[offset : offset + len(images)]
                wait = max(0.0, started - sent_at)
                out[i] = BatchResult(rows, wait, compute, len(merged), offset == 0, joules, source)
                offset += len(images)
        return [r for r in out if r is not None]

    def logits(self, images: np.ndarray) -> np.ndarray:
        if self.onnx is not None:
            return self.onnx.logits("expert", images)
        return predict_logits(self.model, images, self.device, flip=self.flip, cpu_bfloat16=self.cpu_bfloat16)


class RayExpertService(ServiceBase):
    """The HTTP front's service: admitted requests go to their expert's deployment through its handle."""

    def __init__(
        self, metas: dict[str, CheckpointMeta], image_size: int, sc: ResolvedServing, handles: dict[str, Any]
    ) -> None:
        """`metas`: the served experts' metadata; `sc`: this run's serving settings, resolved for Ray."""
        # each expert's replicas batch apart, side by side: its queue splits among them
        super().__init__(metas, image_size, sc, parallel_calls=sc.ray_replicas)
        self.handles = handles

    def compute_s(self, expert_id: str, images: np.ndarray) -> float:
        """The replica's own timing of the call (a batch of these images alone), not the handle's round trip."""
        result: BatchResult = self.handles[expert_id].remote((images, time.time(), None)).result()
        return result.compute_s

    async def __call__(self, expert_id: str, images: np.ndarray, deadline: float | None = None) -> PredictReply:
        now = time.time()
        # the deadline arrives on this process's perf_counter clock; the replica compares wall-clock times
        wall_deadline = None if deadline is None else now + (deadline - time.perf_counter())
        result = await self.handles[expert_id].remote((images, now, wall_deadline))
        if isinstance(result, DeadlineExpired):
            raise result
        return self.reply(expert_id, result)


def expert_apps(system: SystemDir, sc: ResolvedServing, schedule: str, expert_ids: list[str]) -> dict[str, Any]:
    """One Ray Serve application per served expert (its replicas batch its calls), by expert id; `sc`: this
    run's serving settings, resolved for Ray."""
    actor = {"num_cpus": sc.ray_num_cpus, "num_gpus": sc.ray_num_gpus}
    if sc.model_workers > 1:
        warnings.warn(
            f"serving.model_workers ({sc.model_workers}) is the plain engine's; on Ray, "
            "serving.ray_replicas runs an expert's batches side by side",
            stacklevel=2,
        )
    onnx_paths: dict[str, str | None] = dict.fromkeys(expert_ids)
    if sc.model_runtime == "onnx":
        if sc.ray_num_gpus > 0:
            raise ConfigError("serving.model_runtime 'onnx' runs the experts on the CPU; with ray_num_gpus use torch")
        # exported here, once, before any replica starts: replicas of one expert would race to write one file
        backend = LocalExpertBackend.of_system(system, schedule, "cpu")
        exports = export_experts(backend, system, schedule, input_size(system.config().data))
        onnx_paths.update({eid: str(exports[eid].resolve()) for eid in expert_ids})
    # Enough calls admitted per replica to fill one batch while the previous one computes
    # (each call carries at least one image); Ray's default of 5 would cap batches at 5 calls.
    replica = serve.deployment(
        num_replicas=sc.ray_replicas, ray_actor_options=actor, max_ongoing_requests=2 * sc.max_batch_size
    )(ExpertReplica)
    device = "cuda" if sc.ray_num_gpus > 0 else "cpu"
    apps = {}
    for eid in expert_ids:
        apps[eid] = replica.options(name=f"expert-{eid}").bind(
            str(system.expert_path(schedule, eid).resolve()),
            sc.max_batch_size,
            sc.max_wait_ms,
            sc.torch_threads,
            device,
            flip=sc.test_time_flip,
            cpu_bfloat16=sc.cpu_bfloat16,
            onnx_path=onnx_paths[eid],
        )
    return apps


def run_ray(
    root: str | Path | SystemDir,
    sock: socket.socket,
    schedule: str | None,
    token: str | None,
    tls: tuple[Path, Path] | None = None,
    serving: dict[str, Any] | None = None,
) -> None:
    """Start a local Ray instance (or join the cluster in RAY_ADDRESS), deploy the experts, and serve the HTTP
    API on `sock` (`serving.listen.listen_socket`, bound before Ray starts) from this process until interrupted.
    `serving`: settings for this run only, as the plain engine's."""
    import signal

    import ray
    import torch

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    system = SystemDir.of(root)
    cfg = system.config().with_serving(serving or {})  # a bad setting fails here, before Ray starts
    schedule = schedule or cfg.serving.schedule
    # read before Ray starts: a missing or bad checkpoint fails here, with the file's name, not inside a replica
    metas = {eid: read_meta(system.expert_path(schedule, eid)) for eid in system.partition().expert_ids}
    # 'auto' settings for Ray's replicas: on a GPU where they reserve one, else on this host's CPU
    device = torch.device("cuda" if cfg.serving.ray_num_gpus > 0 else "cpu")
    honoured = bfloat16_honoured(cfg.serving.cpu_bfloat16, device)  # warns where not native
    sc = cfg.serving.resolve(device.type, "ray", bfloat16_honoured=honoured)
    apps = expert_apps(system, sc, schedule, list(metas))
    print(f"Ray engine: {len(apps)} experts, {sc.describe()}", flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down: this turns it into the
    # KeyboardInterrupt below, so `kill` also tears the local Ray instance down
    signal.signal(signal.SIGTERM, interrupt)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")  # the HTTP front is ours (serve_http below)
        targets = [RunTarget(app, name=APP_PREFIX + eid, route_prefix=None) for eid, app in apps.items()]
        handles = serve.run_many(targets)
        service = RayExpertService(metas, input_size(cfg.data), sc, dict(zip(apps, handles, strict=True)))
        service.warm_up()
        serve_http(create_app(service, token), sock, service.cfg, tls)
    except KeyboardInterrupt:
        pass
    finally:
        if os.environ.get("RAY_ADDRESS"):
            for eid in apps:
                serve.delete(APP_PREFIX + eid)  # leave a shared cluster as it was
        else:
            serve.shutdown()
        ray.shutdown()
