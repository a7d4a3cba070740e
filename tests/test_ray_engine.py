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
        # 8 images: what the plain server allows a request on a CPU left on 'auto'
        test_images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
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
        said = httpx.get(ray_server.url + "/v1/experts").json()
        limit = said["max_request_images"]
        assert limit == 64  # 'auto' on Ray on a CPU: a handle call's overhead wants 64-image calls
        assert (said["serving"]["max_batch_size"], said["serving"]["queue_delay_target_ms"]) == (64, 70.0)
        body = encode_images(np.zeros((8, 32, 32, 3), dtype=np.uint8))

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=ray_server.url, headers=headers, timeout=60) as client:
                calls = (client.post("/v1/experts/e0/predict", content=body) for _ in range(24))
                replies = await asyncio.gather(*calls)
            # past the queue-delay target some are shed (429): the batches of the answered ones count
            assert {r.status_code for r in replies} <= {200, 429}
            return [r.json()["timing"]["batch_size"] for r in replies if r.status_code == 200]

        sizes = asyncio.run(burst())
        assert sizes and all(8 <= n <= limit for n in sizes), (sizes, limit)
        # the same admission as the plain engine: a budget shorter than the queue's wait is shed with 429
        short = {**headers, "x-askexpert-budget-ms": "1"}

        async def rush() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=ray_server.url, headers=short, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/experts/e0/predict", content=body) for _ in range(24)))

        replies = asyncio.run(rush())
        statuses = [r.status_code for r in replies]
        assert 429 in statuses and set(statuses) <= {200, 429, 504}, statuses
        shed = [r for r in replies if r.status_code == 429]
        assert all(int(r.headers["retry-after"]) >= 1 and "overloaded" in r.json()["error"] for r in shed)
        assert 'askexpert_shed_total{expert="e0",reason="queue_full"}' in httpx.get(ray_server.url + "/metrics").text
    finally:
        ray_server.stop(graceful_s=30)


def test_a_ray_replica_on_onnx_runtime_answers_as_torch(trained_system: Path, tmp_path: Path) -> None:
    """`serving.model_runtime: onnx` on Ray: the replica runs the export the front made, with the mirror image,
    and its logits are torch's (no Ray instance needed: the replica is a plain class until deployed)."""
    from askexpert.errors import ConfigError
    from askexpert.models.local_experts import LocalExpertBackend
    from askexpert.serving.onnx_experts import exported_expert
    from askexpert.serving.ray_app import ExpertReplica, expert_apps

    system = SystemDir.open(trained_system)
    schedule = system.config().serving.schedule
    weights = str(system.expert_path(schedule, "e0"))
    backend = LocalExpertBackend.of_system(system, schedule, "cpu")
    onnx_path = str(exported_expert(backend, "e0", tmp_path / "e0.onnx", 32))
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    on_torch = ExpertReplica(weights, 64, 5.0, 1, "cpu", flip=True, cpu_bfloat16=False)
    on_onnx = ExpertReplica(weights, 64, 5.0, 1, "cpu", flip=True, cpu_bfloat16=False, onnx_path=onnx_path)
    assert on_onnx.onnx is not None and on_torch.onnx is None
    assert np.allclose(on_onnx.logits(images), on_torch.logits(images), atol=1e-4)
    gpu = system.config().with_serving({"model_runtime": "onnx", "ray_num_gpus": 1}).serving.resolve("cuda", "ray")
    with pytest.raises(ConfigError, match="model_runtime 'onnx' runs the experts on the CPU"):
        expert_apps(system, gpu, schedule, ["e0"])
