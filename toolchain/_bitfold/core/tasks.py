"""One execution layer for sweeps: independent tasks run on Dask distributed, or in this process.

A sweep (cost-table calibration, fidelity, fuzzing, a design-space grid) is a list of
:class:`Task` - a top-level function, its arguments and the resources it needs - handed to
:func:`run_tasks`, which returns each task's result by key. Where it runs:

* ``scheduler=None`` (and no ``DASK_SCHEDULER_ADDRESS``): a local Dask cluster on this machine's
  free cores, one single-threaded worker process each, bound to 127.0.0.1, no dashboard; when
  ``distributed`` is not installed (the ``dist`` extra), the in-process path;
* ``scheduler="HOST:PORT"`` (or ``tcp://...``, or ``DASK_SCHEDULER_ADDRESS``): an existing cluster
  (e.g. dask-jobqueue on SLURM/PBS, workers started with ``--resources "CPU=1,GPU=1"``);
* ``scheduler="inprocess"``: sequentially here (debugging, or no Dask).

Guarantees: a task's key is the content hash of its function and arguments, so the same task
given twice runs once, and a re-run of a sweep can skip what was recorded (the key travels with the
result); only the caller writes results anywhere (tasks return them); a worker that dies
mid-task has its task retried elsewhere, a task that raises is retried ``retries`` times and then
reported by name with its error (:class:`TaskFailure`), never as a value - except a
:class:`BitfoldError` (a refused input: the same again on any worker), which is reported at once;
Ctrl-C cancels every pending task and stops a cluster this call started.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable

from bitfold.core.errors import BitfoldError
from bitfold.core.events import events_of

INPROCESS = "inprocess"
CONNECT_TIMEOUT = "5s"          # a scheduler that does not answer within this is reported


@dataclass(frozen=True)
class Task:
    name: str                                   # shown in progress and failures
    fn: Callable                                # a top-level (importable) function
    args: tuple = ()
    resources: dict = field(default_factory=dict)   # e.g. {"CPU": 1} (synthesis) or {"GPU": 1} (training)

    @property
    def key(self) -> str:
        """Content hash of the function's qualified name and the pickled arguments."""
        h = hashlib.sha256(f"{self.fn.__module__}.{self.fn.__qualname__}".encode())
        h.update(pickle.dumps(self.args, protocol=4))
        return h.hexdigest()[:20]


@dataclass
class TaskFailure:
    name: str
    key: str
    error: str

    def __str__(self) -> str:
        return f"{self.name}: {self.error}"


@dataclass
class Refused:
    """What a task returns in place of raising a BitfoldError (reported, not retried)."""
    error: str


def call_task(fn: Callable, *args):
    """Run ``fn(*args)`` on a worker; a BitfoldError comes back as :class:`Refused`."""
    try:
        return fn(*args)
    except BitfoldError as e:
        return Refused(f"BitfoldError: {e}"[:500])


def distributed_available() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def free_cores() -> int:
    """Cores not busy with other work (1-minute load average), at least 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(n, round(n - load + 0.49)))


def _address(scheduler: str | None) -> str | None:
    s = scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if s and s != INPROCESS and "://" not in s:
        s = f"tcp://{s}"
    return s


def _client(address: str | None, workers: int | None):
    """(client, cluster or None) for an address or a fresh local cluster on 127.0.0.1."""
    from distributed import Client, LocalCluster
    if address:
        try:
            return Client(address, timeout=CONNECT_TIMEOUT), None
        except (OSError, TimeoutError) as e:
            raise BitfoldError(f"cannot reach the Dask scheduler at {address} ({type(e).__name__}: {e})",
                               "start one (dask scheduler) and pass its HOST:PORT to --scheduler, "
                               "or leave --scheduler out for a local cluster") from None
    n = workers or free_cores()
    import warnings
    with warnings.catch_warnings():
        # the scheduler's HTTP endpoints (health, metrics; no dashboard) listen on 127.0.0.1 too and
        # take another port when a second local cluster runs: say nothing about it
        warnings.filterwarnings("ignore", message=".*already in use.*")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=40)
    return Client(cluster), cluster


def run_tasks(tasks: list[Task], scheduler: str | None = None, workers: int | None = None, retries: int = 2,
              events=None, skip: set[str] | None = None) -> dict[str, Any]:
    """Run ``tasks``; returns ``{key: result or TaskFailure}`` (each distinct key once).

    ``skip``: keys already done (a re-run of a sweep); they are not run and not returned."""
    ev = events_of(events)
    todo: dict[str, Task] = {}
    for t in tasks:
        if not (skip and t.key in skip):
            todo.setdefault(t.key, t)
    out: dict[str, Any] = {}
    if not todo:
        return out
    address = _address(scheduler)
    local_only = address == INPROCESS or (address is None and not distributed_available())
    ev.progress(0, len(todo))
    if local_only:
        for i, (k, t) in enumerate(todo.items(), 1):
            out[k] = _run_here(t, retries)
            ev.progress(i, len(todo))
        return out
    if not distributed_available():
        raise BitfoldError("a Dask scheduler was given but dask distributed is not installed",
                           "pip install 'bitfold[dist]' (or pass --scheduler inprocess)")
    from distributed import as_completed
    client, cluster = _client(address, workers)
    futs = {}
    try:
        offered = _offered_resources(client) if cluster is None else set()
        missing = {r for t in todo.values() for r in t.resources} - offered
        if offered and missing:
            raise BitfoldError(f"no worker of the Dask cluster at {address} offers {', '.join(sorted(missing))}",
                               "start workers with e.g. --resources \"CPU=1,GPU=1\"")
        for k, t in todo.items():
            # resources place tasks on a cluster whose workers declare them; on a cluster of alike
            # workers (a local one, or workers started without --resources) every worker takes any task
            res = (t.resources or None) if offered else None
            futs[client.submit(call_task, t.fn, *t.args, key=f"bitfold-{k}", retries=retries, pure=False,
                               resources=res)] = k
        for done, f in enumerate(as_completed(futs), 1):
            k = futs[f]
            if f.status == "error":
                exc = f.exception()
                out[k] = TaskFailure(todo[k].name, k, f"{type(exc).__name__}: {exc}"[:500])
            else:
                r = f.result()
                out[k] = TaskFailure(todo[k].name, k, r.error) if isinstance(r, Refused) else r
            ev.progress(done, len(todo))
    except KeyboardInterrupt:
        client.cancel(list(futs))
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return out


def _offered_resources(client) -> set[str]:
    return {r for w in client.scheduler_info().get("workers", {}).values() for r in (w.get("resources") or {})}


def _run_here(t: Task, retries: int):
    err = None
    for _ in range(retries + 1):
        try:
            return t.fn(*t.args)
        except KeyboardInterrupt:
            raise
        except BitfoldError as e:
            return TaskFailure(t.name, t.key, f"BitfoldError: {e}"[:500])
        except Exception as e:  # noqa: BLE001 - reported by name, never as a value
            err = f"{type(e).__name__}: {e}"[:500]
    return TaskFailure(t.name, t.key, err)


def failures(results: dict) -> list[TaskFailure]:
    return [r for r in results.values() if isinstance(r, TaskFailure)]
