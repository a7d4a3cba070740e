"""Benchmark: bare expert throughput vs the expert server under 1, 8 and 32 concurrent clients.

    .venv/bin/python benchmarks/serve_throughput.py --system askexpert-demo [--expert e0] [--engine ray]

Starts `askexpert serve` on a free loopback port, sends requests of
`--images` images each from N concurrent clients (asyncio + `LoadClient`, one process; a
bounded number of requests, with a time cap), and prints throughput, p50/p99 request
latency, the ratio to the bare model's batched throughput, and the CPU the load
generator itself burned; throughput and latency count answered requests only, and the
requests admission refused (429 past `serving.queue_delay_target_ms`) are counted apart;
a refused client waits out the drain the 429 names (`retry_after_ms`) before it sends again.
Goal: >= 0.8 of bare at 32 clients.
The clients and the server share this machine's cores, so the ratio is a
lower bound of what a separate edge machine would see; the client CPU column says
how much of the machine the load generator took from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from askexpert.data import input_size
from askexpert.measure.load import LoadClient
from askexpert.models.local_experts import LocalExpertBackend
from askexpert.models.predict import resolve_device
from askexpert.protocol.http import ErrorReply
from askexpert.protocol.wire import MEDIA_TYPE, encode_images
from askexpert.serving.onnx_experts import OnnxExperts
from askexpert.serving.process import ServerProcess
from askexpert.serving.server import ExpertService, compute_threads
from askexpert.system import SystemDir


def bare_throughput(
    backend: LocalExpertBackend | OnnxExperts, expert: str, batch: int, size: int, windows: int = 5, calls: int = 1
) -> list[float]:
    """The model alone, batch after batch, `calls` at once (the server's `serving.model_workers`, each on
    the server's torch threads): images/s in `windows` one-second windows.

    This machine's speed drifts by ±10 % from second to second, so the ratio is taken
    against the median of windows measured both before and after the server runs.
    """
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)

    def for_a_second() -> int:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            backend.logits(expert, images)
            done += batch
        return done

    rates = []
    with ThreadPoolExecutor(max_workers=calls) as pool:
        list(pool.map(lambda _: backend.logits(expert, images), range(calls)))  # every thread's first call
        for _ in range(windows):
            start = time.perf_counter()
            done = sum(pool.map(lambda _: for_a_second(), range(calls)))
            rates.append(done / (time.perf_counter() - start))
    return rates


def load(
    url: str, expert: str, clients: int, per_request: int, size: int, requests: int, cap_s: float
) -> dict[str, float]:
    """`clients` concurrent request loops on one asyncio event loop.

    `LoadClient` rather than a general client: on 2 shared cores every client-side millisecond is
    taken from the server being measured, and it costs less per request (its docstring).
    """
    body = encode_images(np.random.default_rng(1).integers(0, 256, (per_request, size, size, 3), dtype=np.uint8))
    latencies: list[float] = []  # answered requests (200) only: a refusal is fast and says nothing of serving
    errors = 0
    sent = 0
    per_client = max(1, requests // clients)

    async def run() -> float:
        nonlocal errors
        url_ = f"{url}/v1/experts/{expert}/predict"
        async with LoadClient(url_, body, MEDIA_TYPE, timeout_s=60) as client:
            deadline = time.perf_counter() + cap_s

            async def worker() -> None:
                nonlocal errors, sent
                for _ in range(per_client):
                    if time.perf_counter() > deadline:
                        return
                    t0 = time.perf_counter()
                    reply = await client.post()
                    sent += 1
                    if reply.status == 429:  # refused: wait out the drain the server names, then send again
                        errors += 1
                        await asyncio.sleep(ErrorReply.model_validate_json(reply.body).retry_after_s)
                        continue
                    if reply.status != 200:
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - t0)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return time.perf_counter() - start

    cpu0 = time.process_time()
    wall = asyncio.run(run())
    client_cpu = (time.process_time() - cpu0) / wall
    lat = np.asarray(latencies or [np.nan]) * 1e3
    return {
        "clients": clients,
        "requests": sent,
        "errors": errors,  # refused (429 under the queue-delay target) or failed
        "images_per_s": len(latencies) * per_request / wall,  # answered images only
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "client_cpu": client_cpu,  # cores the load generator kept busy on average
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", default="askexpert-demo")
    ap.add_argument("--expert", default="e0")
    ap.add_argument("--engine", default="http", choices=["http", "ray"], help="which engine serves")
    ap.add_argument("--images", type=int, default=8, help="images per request")
    ap.add_argument("--requests", type=int, default=1280, help="requests per concurrency level")
    ap.add_argument("--cap-s", type=float, default=30.0, help="time cap per level")
    args = ap.parse_args()
    system = SystemDir.open(args.system)
    cfg = system.config()
    size = input_size(cfg.data)
    engine = "ray" if args.engine == "ray" else "plain"
    # the settings the server resolves ('auto' follows the hardware), for the model calls run as it runs them
    sc = cfg.serving.resolve(resolve_device(cfg.device).type, engine, len(os.sched_getaffinity(0)))
    threads = compute_threads(sc)
    if threads:
        torch.set_num_threads(threads)
    # bare: the model calls the server makes, in the runtime it resolves (ONNX Runtime on a CPU: the plain
    # engine's threads per call, a Ray replica's one), so that the ratio compares serving with the same computation
    bare_model: LocalExpertBackend | OnnxExperts
    if engine == "plain":
        plain = ExpertService.from_system(system)
        bare_model = plain.onnx or plain.backend
    else:
        bare_model = LocalExpertBackend.of_system(system)
        if sc.model_runtime == "onnx":
            bare_model = OnnxExperts.of_backend(bare_model, system, cfg.serving.schedule, size, sc.torch_threads or 1)
    measure_bare = functools.partial(bare_throughput, bare_model, args.expert, sc.max_batch_size, size)
    bare_windows = measure_bare(calls=sc.model_workers)
    server = ServerProcess(args.system, "--engine", args.engine)
    url = server.wait_ready().url
    results = []
    try:
        load(url, args.expert, 4, args.images, size, 16, 10)  # warm-up
        for clients in (1, 8, 32):
            results.append(load(url, args.expert, clients, args.images, size, args.requests, args.cap_s))
    finally:
        server.stop()
    bare_windows += measure_bare(calls=sc.model_workers)
    bare = float(np.median(bare_windows))
    print(
        f"bare expert {args.expert} ({cfg.expert.preset}, {sc.model_runtime}), batch {sc.max_batch_size}, "
        f"{sc.model_workers} call(s) at once: "
        f"{bare:,.0f} images/s (median of {len(bare_windows)} one-second windows before and after, "
        f"range {min(bare_windows):,.0f}-{max(bare_windows):,.0f})"
    )
    print(
        f"server ({args.engine} engine: {sc.describe()}), {args.images} images per request "
        f"(max wait {cfg.serving.max_wait_ms:g} ms):"
    )
    print("| clients | requests | errors | images/s | p50 ms | p99 ms | ratio to bare | client CPU (cores) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['images_per_s']:,.0f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['images_per_s'] / bare:.2f} | {r['client_cpu']:.2f} |"
        )


if __name__ == "__main__":
    main()
