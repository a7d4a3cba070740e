"""Benchmark: the expert server under open-loop load at 0.5×, 1×, 2× and 4× its capacity.

    .venv/bin/python benchmarks/serve_overload.py --system askexpert-demo [--seconds 60] [--images 4]

Open loop: requests are sent at a constant rate whatever the server does (a camera
does not slow down because the server is busy), unlike the closed-loop clients of
`serve_throughput.py`. Capacity is first measured closed-loop (32 clients). At each
rate the script reports goodput (answered images/s), the shed rate (429s), 5xx
answers, and p50/p99 latency of accepted requests; meanwhile an edge client
(HttpExpertBackend, everything offloaded) classifies images and checks that every
sample is answered, by an expert or by a fallback. Writes
`DIR/report/serve_overload.{md,csv,json,png}`.

Targets: 0 answers with status 5xx; p99 of accepted requests ≤ 4× its value at 0.5×;
every edge sample answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from typing import Any

import aiohttp
import matplotlib
import numpy as np

from askexpert.data import input_size
from askexpert.evaluate.report import finish_plot, markdown_table, write_csv
from askexpert.inference.edge import connect, edge_classifier
from askexpert.protocol.wire import MEDIA_TYPE, encode_images
from askexpert.serving.process import ServerProcess
from askexpert.system import SystemDir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


async def _closed_loop(url: str, body: bytes, clients: int, seconds: float) -> float:
    """Requests/s that `clients` back-to-back loops get answered: the capacity."""
    done = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(headers={"content-type": MEDIA_TYPE}) as session:

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with session.post(url, data=body) as r:
                    await r.read()
                    done += r.status == 200

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        return done / (time.perf_counter() - start)


async def _open_loop(url: str, body: bytes, rate: float, seconds: float) -> dict[str, Any]:
    """Send at `rate` requests/s for `seconds`, whatever the answers; collect status and latency."""
    statuses: list[int] = []
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers={"content-type": MEDIA_TYPE}, connector=connector, timeout=timeout) as s:

        async def one() -> None:
            start = time.perf_counter()
            try:
                async with s.post(url, data=body) as r:
                    await r.read()
                    statuses.append(r.status)
                    if r.status == 200:
                        latencies.append(time.perf_counter() - start)
            except (aiohttp.ClientError, TimeoutError):
                statuses.append(0)

        tasks = []
        begin = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    arr = np.asarray(statuses)
    lat = np.asarray(latencies) * 1e3
    return {
        "offered_rps": rate,
        "sent": int(len(arr)),
        "ok": int((arr == 200).sum()),
        "shed_429": int((arr == 429).sum()),
        "status_5xx": int(((arr >= 500) & (arr < 600)).sum()),
        "failed_connection": int((arr == 0).sum()),
        "goodput_rps": float((arr == 200).sum() / elapsed),
        "shed_rate": float((arr == 429).mean()) if len(arr) else float("nan"),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def _edge_in_the_loop(system: SystemDir, url: str, stop: threading.Event, out: dict[str, int]) -> None:
    """An edge client offloading everything while the load runs: count samples and answers."""
    backend, http = connect(system, url)
    try:
        clf = edge_classifier(system, backend)
        clf.router.tau = 1.01
        size = input_size(system.config().data)
        images = np.random.default_rng(2).integers(0, 256, (16, size, size, 3), dtype=np.uint8)
        while not stop.is_set():
            pred = clf(images)
            out["samples"] += len(images)
            out["answered"] += int(np.isin(pred.source, ["expert", "fallback"]).sum())
            out["fallback"] += int((pred.source == "fallback").sum())
    finally:
        http.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", default="askexpert-demo")
    ap.add_argument("--expert", default="e0")
    ap.add_argument("--images", type=int, default=4, help="images per request")
    ap.add_argument("--seconds", type=float, default=60.0, help="per load level")
    ap.add_argument("--levels", default="0.5,1,2,4", help="multiples of the measured capacity")
    args = ap.parse_args()

    system = SystemDir.open(args.system)
    size = input_size(system.config().data)
    body = encode_images(np.random.default_rng(1).integers(0, 256, (args.images, size, size, 3), dtype=np.uint8))
    server = ServerProcess(system.root, env={"OMP_WAIT_POLICY": "PASSIVE"})
    rows: list[dict[str, Any]] = []
    try:
        server.wait_ready()
        url = f"{server.url}/v1/experts/{args.expert}/predict"
        capacity = asyncio.run(_closed_loop(url, body, 32, min(10.0, args.seconds)))
        print(f"capacity (closed loop, 32 clients): {capacity:.1f} requests/s ({capacity * args.images:.0f} images/s)")
        for level in [float(x) for x in args.levels.split(",")]:
            stop, edge = threading.Event(), {"samples": 0, "answered": 0, "fallback": 0}
            thread = threading.Thread(target=_edge_in_the_loop, args=(system, server.url, stop, edge))
            thread.start()
            row = asyncio.run(_open_loop(url, body, level * capacity, args.seconds))
            stop.set()
            thread.join()
            row = {"level": level, **row, "edge_samples": edge["samples"], "edge_answered": edge["answered"]}
            row["edge_fallback"] = edge["fallback"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    base_p99 = rows[0]["p99_ms"]
    for row in rows:
        row["p99_vs_half_load"] = row["p99_ms"] / base_p99 if base_p99 else float("nan")
    out = system.report_dir
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "serve_overload.csv", rows)
    (out / "serve_overload.json").write_text(json.dumps({"capacity_rps": capacity, "rows": rows}, indent=1))
    columns = ["level", "offered_rps", "goodput_rps", "shed_rate", "status_5xx", "p50_ms", "p99_ms"]
    columns += ["p99_vs_half_load", "edge_samples", "edge_answered"]
    table = markdown_table(rows, columns)
    (out / "serve_overload.md").write_text(
        f"# Open-loop overload ({args.images} images per request, {args.seconds:g} s per level)\n\n"
        f"Capacity (closed loop, 32 clients): {capacity:.1f} requests/s.\n\n{table}"
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    offered = [r["offered_rps"] for r in rows]
    ax.plot(offered, [r["goodput_rps"] for r in rows], marker="o", label="goodput (answered requests/s)")
    ax.plot(offered, [r["shed_rate"] * r["offered_rps"] for r in rows], marker="x", label="shed (429/s)")
    ax.plot(offered, offered, linestyle=":", color="grey", label="offered")
    finish_plot(
        fig,
        ax,
        out / "serve_overload.png",
        "offered load (requests/s)",
        "requests/s",
        "Expert server under open-loop load",
    )
    print(table)
    print(f"written to {out}/serve_overload.*")


if __name__ == "__main__":
    main()
