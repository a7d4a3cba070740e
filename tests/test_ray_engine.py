"""`askexpert serve --engine ray`: the same API and labels on Ray Serve (one test; Ray costs ~1 GB and ~20 s)."""

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from askexpert.inference.edge import edge_classifier
from askexpert.inference.http_backend import HttpExpertBackend
from askexpert.protocol.wire import MEDIA_TYPE, encode_images
from askexpert.system import SystemDir
from conftest import ServerProcess

pytest.importorskip("ray.serve")


@pytest.mark.slow
def test_ray_engine_answers_like_the_http_engine(trained_system: Path, server: ServerProcess) -> None:
    ray_server = ServerProcess(trained_system, "--engine", "ray", ready_s=180)
    try:
        system = SystemDir.open(trained_system)
        test_images = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
        headers = {"content-type": MEDIA_TYPE}
        for expert in ("e0", "e1"):
            url = f"/v1/experts/{expert}/predict"
            a = httpx.post(server.url + url, headers=headers, content=encode_images(test_images), timeout=60).json()
            b = httpx.post(ray_server.url + url, headers=headers, content=encode_images(test_images), timeout=60).json()
            assert a["labels"] == b["labels"] and a["other"] == b["other"]
            assert np.allclose(a["confidence"], b["confidence"], atol=1e-5)
        assert (
            httpx.get(ray_server.url + "/v1/experts").json()["experts"]
            == httpx.get(server.url + "/v1/experts").json()["experts"]
        )
        bad = httpx.post(ray_server.url + "/v1/experts/e7/predict", headers=headers, content=encode_images(test_images))
        assert bad.status_code == 404 and "unknown expert" in bad.json()["error"]
        # the edge client does not care which engine answers
        from askexpert.data import load_splits

        test = load_splits(system.config().data, trained_system).test
        backend_http = HttpExpertBackend(server.url, system.config().serving)
        backend_ray = HttpExpertBackend(ray_server.url, system.config().serving)
        via_http = edge_classifier(system, backend_http)(test.images)
        via_ray = edge_classifier(system, backend_ray)(test.images)
        backend_http.close()
        backend_ray.close()
        assert via_http.labels.tolist() == via_ray.labels.tolist()
        assert (via_ray.source == "expert").any()
        # concurrent requests are merged, but a batch never exceeds max_batch_size *images*
        limit = system.config().serving.max_batch_size
        body = encode_images(np.zeros((8, 32, 32, 3), dtype=np.uint8))

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=ray_server.url, headers=headers, timeout=60) as client:
                calls = (client.post("/v1/experts/e0/predict", content=body) for _ in range(24))
                replies = await asyncio.gather(*calls)
            return [r.json()["timing"]["batch_size"] for r in replies]

        sizes = asyncio.run(burst())
        assert all(8 <= n <= limit for n in sizes), (sizes, limit)
    finally:
        ray_server.stop(graceful_s=30)
