"""EdgeTAM (the CPU-class SAM 2) through every way tapmask serves a model: the CVAT function,
the Redis worker pool, and (in test_labelstudio_e2e.py) the real Label Studio."""

from __future__ import annotations

import numpy as np

from backends.prompts import Click, Prompt
from backends.redis.dispatcher import RedisDispatcher
from tests.support.cvat_harness import NuclioFunction, check_mask_reply, cvat_payload, function_env
from tests.support.processes import RedisServer, WorkerProcess


def test_cvat_function_serves_edgetam(edgetam_dir, grabcut_dir):
    data = (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes()
    env = function_env("sam") | {
        "TAPMASK_MODEL": "edgetam",
        "EDGETAM_MODEL_DIR": str(edgetam_dir),
        "TAPMASK_DEVICE": "cpu",
    }
    function = NuclioFunction(env)
    first = check_mask_reply(function.call(cvat_payload(data, [[150.0, 200.0]], [], [])), 284, 398)
    second = function.call(cvat_payload(data, [[150.0, 200.0]], [[10.0, 10.0]], []))
    check_mask_reply(second, 284, 398)
    assert first.any()
    assert function.engine.stats.encodes == 1  # the second click was a decode only
    box = function.call(cvat_payload(data, [], [], [[40.0, 60.0], [250.0, 380.0]]))
    check_mask_reply(box, 284, 398)


def test_worker_serves_edgetam(edgetam_dir, grabcut_dir, tmp_path):
    data = (grabcut_dir / "data_GT" / "teddy.jpg").read_bytes()
    with RedisServer() as server:
        worker = WorkerProcess(
            server.url,
            ["edgetam"],
            name="edgetam",
            log_dir=str(tmp_path),
            extra_args=["--checkpoint", str(edgetam_dir), "--device", "cpu"],
        )
        try:
            worker.wait_ready(server.client())
            dispatcher = RedisDispatcher(server.url, job_timeout=60)
            first = dispatcher.segment("edgetam", data, Prompt((Click(150, 200),)))
            second = dispatcher.segment(
                "edgetam", data, Prompt((Click(150, 200), Click(10, 10, False)))
            )
            assert first.mask.shape == second.mask.shape == (398, 284)
            assert first.mask.any() and np.isfinite(second.score)
            dispatcher.close()
        finally:
            worker.stop(timeout=5)
