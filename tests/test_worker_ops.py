"""Operating the worker pool the way Kubernetes does: drains (SIGTERM mid-click), the worker's own
job-time bound, batch-only workers, and the Prometheus metrics of a real worker process, checked
against ``tapmask workers`` and against every metric the Grafana dashboard and the alert rules in
deploy/kubernetes/monitoring/ name.

Style and fixtures as in test_queue_redis.py: one private redis-server for this module, worker
processes with the test models of tests/support/queue_models.py.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import threading
import time
import urllib.request
from typing import Any

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from backends import images
from backends.dispatch import LocalDispatcher
from backends.engine import Engine
from backends.errors import TapmaskError, Timeout, Unavailable
from backends.labelstudio.app import Settings, create_app
from backends.models.grabcut import GrabCutSegmenter
from backends.prompts import Click, Prompt
from backends.redis.dispatcher import RedisDispatcher
from backends.redis.pool import print_pool
from backends.redis.protocol import Keys
from deploy import check
from tests.support.processes import RedisServer, WorkerProcess, free_port

PLUGIN = "tests.support.queue_models"
MONITORING = check.KUBERNETES / "monitoring"


def _png(seed: int, width: int = 40, height: int = 30) -> bytes:
    rng = np.random.default_rng(seed)
    return images.encode_png(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _wait_for(predicate, timeout: float = 10.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(step)


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def rconn(server):
    client = server.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def spawn(server, tmp_path_factory):
    """Start worker processes; all of them are stopped (warm, then killed) at the end."""
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("workers")

    def start(name: str, models: list[str], extra_args: list[str] = ()) -> WorkerProcess:
        worker = WorkerProcess(
            server.url,
            models,
            name=name,
            plugins=[PLUGIN],
            env={"TAPMASK_TEST_REDIS_URL": server.url},
            log_dir=str(logs),
            extra_args=list(extra_args),
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=5)


@pytest.fixture(scope="module")
def make_dispatcher(server):
    made: list[RedisDispatcher] = []

    def make(**kwargs) -> RedisDispatcher:
        kwargs.setdefault("queue_ttl", 3)
        kwargs.setdefault("job_timeout", 10)
        kwargs.setdefault("grace", 1)
        dispatcher = RedisDispatcher(server.url, **kwargs)
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        dispatcher.close()


def _listing(server) -> dict[str, Any]:
    """``tapmask workers --json``, as an operator would run it."""
    args = argparse.Namespace(redis_url=server.url, namespace="tapmask", json=True)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert print_pool(args) == 0
    return json.loads(out.getvalue())


def _scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


Samples = dict[tuple[str, frozenset], float]


def _samples(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of a metric over the series whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and wanted <= set(lbl))


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape offers, including families without samples yet (a labelled
    histogram nobody observed, CUDA memory on a CPU worker): its TYPE line declares it."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return names


#: PromQL words that look like names but are not metrics.
_PROMQL_WORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana query) reads."""
    found = set(re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,", expr))
    text = re.sub(r"label_values\([^)]*\)", "", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # strings (label values, templates)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    text = re.sub(r"(?<![\w.])\d+(\.\d+)?([eE][+-]?\d+)?", "", text)  # numbers
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() not in _PROMQL_WORDS:
            found.add(match.group(0))
    return found


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "tapmask-dashboard.json").read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def _alert_queries() -> list[str]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]


def test_metric_names_reads_promql_like_prometheus():
    expr = (
        'histogram_quantile(0.95, sum by (model, le) (rate(a_bucket{queue="x",model=~"$model"}'
        "[$__rate_interval]))) > 4 unless on(model) b_total / clamp_min(c, 1e-9) and bool d"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}
    assert metric_names("label_values(tapmask_pool_workers, model)") == {"tapmask_pool_workers"}


# -- a worker exercised once: its metrics, `tapmask workers`, the dashboard ------------------------


@pytest.fixture(scope="module")
def exercised(spawn, make_dispatcher, rconn, server, tmp_path_factory):
    """A worker with a metrics port after two good clicks, a bad click, a prefetch and a job
    that is not a tapmask job; returns its port, its scrape and ``tapmask workers``."""
    port = free_port()
    worker = spawn("metrics", ["test-counting"], ["--metrics-port", str(port)]).wait_ready(rconn)
    dispatcher = make_dispatcher()
    first, second = _png(1), _png(2)
    assert dispatcher.segment("test-counting", first, Prompt((Click(3, 3),))).mask[3, 3]
    assert dispatcher.segment("test-counting", first, Prompt((Click(3, 3), Click(5, 5))))
    with pytest.raises(TapmaskError) as bad:
        dispatcher.segment("test-counting", first, Prompt((Click(500, 3),)))
    assert bad.value.status == 400
    dispatcher.prefetch("test-counting", second)
    foreign = Queue(
        Keys().interactive("test-counting"), connection=rconn, serializer=JSONSerializer
    ).enqueue_call("tests.support.queue_models.touch", args=("/nonexistent/x",))
    _wait_for(lambda: Result.fetch_latest(foreign, serializer=JSONSerializer))
    _wait_for(lambda: int(rconn.get("test:encodes:test-counting") or 0) == 2)

    def settled():  # the heartbeat carried the last job into the presence record
        (record,) = [w for w in _listing(server)["workers"] if w["name"] == "metrics"]
        return record["jobs"] == 4 and record["stats"]["encodes"] == 2

    _wait_for(settled)
    return {"port": port, "text": _scrape(port), "listing": _listing(server), "worker": worker}


def test_worker_metrics_count_jobs_by_queue_and_outcome(exercised):
    samples = _samples(exercised["text"])
    jobs = "tapmask_worker_jobs_total"
    common = {"model": "test-counting"}
    assert (
        _value(samples, jobs, **common, queue="interactive", function="segment_job", outcome="ok")
        == 2
    )
    assert (
        _value(
            samples,
            jobs,
            **common,
            queue="interactive",
            function="segment_job",
            outcome="client_error",
        )
        == 1
    )
    assert (
        _value(samples, jobs, **common, queue="batch", function="prefetch_job", outcome="ok") == 1
    )
    assert (
        _value(samples, jobs, **common, queue="interactive", function="other", outcome="failed")
        == 1
    )
    assert _total(samples, jobs, outcome="error") == 0
    # Every started job waited in a queue and ran; two images, two encodes.
    assert (
        _value(samples, "tapmask_worker_queue_wait_seconds_count", **common, queue="interactive")
        == 4
    )
    assert _value(samples, "tapmask_worker_queue_wait_seconds_count", **common, queue="batch") == 1
    assert _total(samples, "tapmask_worker_job_seconds_count") == 5
    assert _value(samples, "tapmask_worker_encode_seconds_count", **common) == 2
    assert _value(samples, "tapmask_engine_encodes_total") == 2
    assert _value(samples, "tapmask_cache_entries", cache="embeddings") == 2
    assert _value(samples, "tapmask_cache_hits_total", cache="images") >= 2
    assert _value(samples, "tapmask_worker_busy") == 0
    assert _value(samples, "tapmask_worker_redis_up") == 1
    assert 0 <= _value(samples, "tapmask_worker_heartbeat_age_seconds") < 1.0
    assert _scrape(exercised["port"], "/healthz") == "ok\n"


def test_tapmask_workers_and_the_metrics_agree(exercised):
    samples = _samples(exercised["text"])
    listing = exercised["listing"]
    (record,) = [w for w in listing["workers"] if w["name"] == "metrics"]
    jobs = "tapmask_worker_jobs_total"
    # JOBS counts every reply, ERR every error reply (see backends/redis/metrics.py).
    assert record["jobs"] == _total(samples, jobs) - _total(samples, jobs, outcome="failed")
    assert record["errors"] == _total(samples, jobs, outcome="client_error") + _total(
        samples, jobs, outcome="error"
    )
    assert record["stats"]["encodes"] == _value(samples, "tapmask_engine_encodes_total")
    assert record["metrics_port"] == exercised["port"]
    info = {
        dict(labels)["worker"]: dict(labels)
        for (name, labels) in samples
        if name == "tapmask_worker_info"
    }
    assert info["metrics"]["models"] == ",".join(record["models"])
    assert info["metrics"]["hostname"] == record["hostname"]
    assert info["metrics"]["queues"] == "interactive,batch"
    # The pool as every worker reports it is the pool `tapmask workers` lists.
    for model, depths in listing["queues"].items():
        for kind, depth in depths.items():
            assert _value(samples, "tapmask_queue_waiting_jobs", model=model, queue=kind) == depth
            listening = sum(Keys().queue(model, kind) in w["queues"] for w in listing["workers"])
            assert _value(samples, "tapmask_pool_workers", model=model, queue=kind) == listening


def _labelstudio_scrape() -> str:
    engine = Engine({"grabcut": GrabCutSegmenter()})
    app = create_app(LocalDispatcher(engine), Settings(model="grabcut", label_studio_url=None))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        return client.get("/metrics").text


def test_dashboard_and_alerts_name_only_metrics_that_exist(exercised):
    exposed = exposed_names(exercised["text"]) | exposed_names(_labelstudio_scrape())
    queries = _dashboard_queries() + _alert_queries()
    assert len(queries) > 20
    missing = {}
    for query in queries:
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        if names - exposed:
            missing[query] = sorted(names - exposed)
    assert missing == {}
    # The alerts the issue asks for read what they should.
    alerts = " ".join(_alert_queries())
    for name in (
        "tapmask_pool_workers",
        "tapmask_worker_queue_wait_seconds_bucket",
        "tapmask_worker_jobs_total",
    ):
        assert name in alerts


# -- drains ----------------------------------------------------------------------------------------


def _click_in_thread(dispatcher: RedisDispatcher, model: str, seed: int) -> dict[str, Any]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["result"] = dispatcher.segment(model, _png(seed), Prompt((Click(2, 2),)))
        except TapmaskError as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    outcome["thread"] = threading.Thread(target=run)
    outcome["thread"].start()
    return outcome


def _encoding_pids(rconn, model: str, count: int) -> list[int]:
    pids = []
    while len(pids) < count:
        popped = rconn.blpop(f"test:log:{model}", timeout=10)
        assert popped is not None, "no encode started"
        what, pid = popped[1].decode().split()
        if what == "encode-start":
            pids.append(int(pid))
    return pids


def test_sigterm_mid_click_drains_like_kubernetes(spawn, make_dispatcher, rconn, server):
    """A scale-down or rollout: Kubernetes sends SIGTERM to a busy worker, waits the grace
    period, then kills it. The click it runs is answered, the clicks waiting in the queue (what
    KEDA counted) go to the other worker, and it leaves well within the grace period."""
    model, grace, job_timeout = "test-sleepy", 10.0, 6  # 2 s encodes; grace > job timeout
    port = free_port()
    draining = spawn("drain-a", [model], ["--job-timeout", str(job_timeout)])
    staying = spawn(
        "drain-b", [model], ["--job-timeout", str(job_timeout), "--metrics-port", str(port)]
    )
    for worker in (draining, staying):
        worker.wait_ready(rconn)
    dispatcher = make_dispatcher(queue_ttl=10, job_timeout=30)
    rconn.delete(f"test:log:{model}")
    busy = [_click_in_thread(dispatcher, model, seed) for seed in (40, 41)]
    assert sorted(_encoding_pids(rconn, model, 2)) == sorted([draining.pid, staying.pid])
    waiting = [_click_in_thread(dispatcher, model, seed) for seed in (42, 43)]
    queue_list = Keys.queue_list(Keys().interactive(model))
    _wait_for(lambda: rconn.llen(queue_list) == 2)
    samples = _samples(_scrape(port))  # what KEDA and the dashboard see right now
    assert _value(samples, "tapmask_queue_waiting_jobs", model=model, queue="interactive") == 2
    assert _value(samples, "tapmask_pool_workers", model=model, queue="interactive") == 2
    assert _value(samples, "tapmask_worker_busy") == 1

    draining.terminate()  # SIGTERM mid-click
    sent = time.monotonic()
    presence = Keys().presence("drain-a")
    _wait_for(lambda: b'"stopping"' in (rconn.get(presence) or b'"stopping"'), step=0.02)
    try:
        exit_code = draining.proc.wait(grace)
    except subprocess.TimeoutExpired:  # what Kubernetes does at the end of the grace period
        draining.kill()
        raise AssertionError(f"the worker outlived its grace period:\n{draining.log()}") from None
    left_after = time.monotonic() - sent
    assert exit_code == 0
    assert left_after < 2.0 + 1.5  # the rest of its 2 s click, then out
    assert rconn.get(presence) is None  # deregistered: dispatchers stop counting it at once

    for outcome in busy + waiting:
        outcome["thread"].join(20)
        assert "error" not in outcome, outcome.get("error")
    answered_by = [o["result"].extra["worker"] for o in busy + waiting]
    assert answered_by.count("drain-a") == 1  # its running click, answered; nothing new taken
    assert answered_by.count("drain-b") == 3
    assert rconn.llen(queue_list) == 0
    queue = Queue(Keys().interactive(model), connection=rconn, serializer=JSONSerializer)
    assert FailedJobRegistry(queue=queue).count == 0
    assert StartedJobRegistry(queue=queue).count == 0


def test_the_worker_bounds_every_job_by_its_own_timeout(spawn, make_dispatcher, rconn):
    """TAPMASK_JOB_TIMEOUT on the worker caps a job whatever its front end asked for, so a
    drain can never outlast ``terminationGracePeriodSeconds`` (set above it)."""
    model = "test-snooze"  # 3 s encodes
    worker = spawn("bounded", [model], ["--job-timeout", "1"]).wait_ready(rconn)
    dispatcher = make_dispatcher(queue_ttl=3, job_timeout=30)  # the front end would wait 30 s
    started = time.monotonic()
    with pytest.raises(Timeout) as info:
        dispatcher.segment(model, _png(50), Prompt((Click(1, 1),)))
    assert info.value.status == 504 and time.monotonic() - started < 2.5

    rconn.delete(f"test:log:{model}")
    outcome = _click_in_thread(dispatcher, model, 51)
    _encoding_pids(rconn, model, 1)
    worker.terminate()
    sent = time.monotonic()
    assert worker.wait(10) == 0
    assert time.monotonic() - sent < 2.5  # the capped job, not the 3 s encode
    outcome["thread"].join(10)
    assert isinstance(outcome.get("error"), Timeout)  # answered (504), not lost


def test_batch_only_workers_never_take_a_click(spawn, make_dispatcher, rconn, server, capsys):
    model, port = "test-slow", free_port()
    spawn("batch-only", [model], ["--queue-kinds", "batch", "--metrics-port", str(port)])
    _wait_for(lambda: rconn.exists(Keys().presence("batch-only")), timeout=60)
    dispatcher = make_dispatcher(queue_ttl=1)
    dispatcher.prefetch(model, _png(60))
    _wait_for(lambda: int(rconn.get(f"test:encodes:{model}") or 0) == 1)
    with pytest.raises(Unavailable):
        dispatcher.segment(model, _png(61), Prompt((Click(1, 1),)))
    # A click is refused at its first poll, not after the queue TTL: the batch-only worker is
    # alive but does not count as taking this model's clicks.
    patient = make_dispatcher(queue_ttl=30)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        patient.segment(model, _png(62), Prompt((Click(1, 1),)))
    assert time.monotonic() - started < 10
    assert "batch-only workers take no clicks" in str(info.value)
    samples = _samples(_scrape(port))
    assert _total(samples, "tapmask_worker_jobs_total", queue="interactive") == 0
    assert (
        _value(
            samples,
            "tapmask_worker_jobs_total",
            model=model,
            queue="batch",
            function="prefetch_job",
            outcome="ok",
        )
        == 1
    )
    # What TapmaskNoLiveWorker fires on: nobody takes this model's clicks.
    assert _value(samples, "tapmask_pool_workers", model=model, queue="interactive") == 0
    assert _value(samples, "tapmask_pool_workers", model=model, queue="batch") == 1
    args = argparse.Namespace(redis_url=server.url, namespace="tapmask", json=False)
    assert print_pool(args) == 0
    (line,) = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("batch-only")
    ]
    assert line.split()[3] == "b" and line.split()[-1] == model
