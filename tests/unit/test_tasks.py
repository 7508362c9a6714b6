"""The sweep execution layer (bitfold.core.tasks): in-process path, a loopback Dask cluster with two
workers (nothing listens beyond 127.0.0.1), a worker killed mid-sweep, a bad address."""
import os
import signal
import sys
import threading
import time

import pytest

from bitfold.core.errors import BitfoldError
from bitfold.core.tasks import Task, TaskFailure, failures, run_tasks


def square_after(x, delay=0.0):
    time.sleep(delay)
    return x * x


def fails_on(x, bad):
    if x == bad:
        raise ValueError(f"block {x} is broken")
    return x


def test_inprocess_runs_each_key_once_skips_done_and_names_failures():
    calls = []

    def counted(x):
        calls.append(x)
        return x + 1
    tasks = [Task(f"t{x}", counted, (x,)) for x in (1, 2, 2, 3)]
    assert tasks[1].key == tasks[2].key != tasks[0].key
    res = run_tasks(tasks, scheduler="inprocess")
    assert sorted(res.values()) == [2, 3, 4] and sorted(calls) == [1, 2, 3]
    again = run_tasks(tasks, scheduler="inprocess", skip={tasks[0].key})
    assert tasks[0].key not in again and len(again) == 2
    res = run_tasks([Task(f"b{x}", fails_on, (x, 2)) for x in (1, 2)], scheduler="inprocess", retries=1)
    bad = failures(res)
    assert len(bad) == 1 and isinstance(bad[0], TaskFailure) and bad[0].name == "b2" and "broken" in bad[0].error
    calls.clear()

    def refused(x):      # a refused input is the same on every try: reported at once, not retried
        calls.append(x)
        raise BitfoldError(f"width {x} is outside [1, 8]", "use 1..8")
    bad = failures(run_tasks([Task("r", refused, (9,))], scheduler="inprocess", retries=2))
    assert calls == [9] and bad[0].error == "BitfoldError: width 9 is outside [1, 8] -> use 1..8"


@pytest.fixture()
def loopback_cluster():
    pytest.importorskip("distributed", reason="dask distributed is not installed (the dist extra)")
    import cloudpickle
    from distributed import Client, LocalCluster
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import tests/
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=40)
    client = Client(cluster)
    try:
        yield cluster, client
    finally:
        client.close()
        cluster.close(timeout=30)
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _listening(pid):
    import psutil
    return [c.laddr for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def test_loopback_cluster_listens_on_127_0_0_1_only_and_survives_a_killed_worker(loopback_cluster):
    cluster, client = loopback_cluster
    worker_pids = list(client.run(os.getpid).values())
    nanny_pids = [w.process.pid for w in cluster.workers.values()]
    socks = [a for pid in [os.getpid(), *worker_pids, *nanny_pids] for a in _listening(pid)]
    assert socks and all(a.ip == "127.0.0.1" for a in socks), socks
    tasks = [Task(f"sq{x}", square_after, (x, 0.4)) for x in range(12)]

    def kill_one():
        time.sleep(1.0)
        os.kill(worker_pids[0], signal.SIGKILL)       # mid-sweep: its running task is retried elsewhere
    threading.Thread(target=kill_one, daemon=True).start()
    res = run_tasks(tasks, scheduler=cluster.scheduler_address)
    assert not failures(res) and sorted(res.values()) == sorted(x * x for x in range(12)) and len(res) == 12
    assert worker_pids[0] not in client.run(os.getpid).values()       # the worker did die


def test_failing_task_is_named_and_bad_address_is_one_clear_error(loopback_cluster):
    cluster, _ = loopback_cluster
    res = run_tasks([Task(f"b{x}", fails_on, (x, 3)) for x in range(5)], scheduler=cluster.scheduler_address,
                    retries=1)
    bad = failures(res)
    assert [b.name for b in bad] == ["b3"] and "broken" in bad[0].error and len(res) == 5
    with pytest.raises(BitfoldError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        run_tasks([Task("x", square_after, (1,))], scheduler="127.0.0.1:9")


def test_resources_place_tasks_and_a_missing_one_is_named():
    pytest.importorskip("distributed", reason="dask distributed is not installed (the dist extra)")
    import cloudpickle
    from distributed import LocalCluster
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, silence_logs=40, resources={"CPU": 1}) as cluster:
            res = run_tasks([Task("cpu", square_after, (3,), {"CPU": 1})], scheduler=cluster.scheduler_address)
            assert list(res.values()) == [9]
            with pytest.raises(BitfoldError, match="offers GPU"):
                run_tasks([Task("train", square_after, (3,), {"GPU": 1})], scheduler=cluster.scheduler_address)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
