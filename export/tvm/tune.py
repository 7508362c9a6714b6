"""MetaSchedule tuning for the TVM backend, with one tuning database per board and target.

The database (TVM's own ``JSONDatabase``: ``database_workload.json`` + ``database_tuning_record.json``)
lives in ``$BITFOLD_HOME/tvm-tuning/<board>-<target hash>/``. Every build applies it; a build with
``tune_trials > 0`` first tunes the kernels that have no record yet (``retune`` tunes all of them again),
so a rebuild of the same model, or of a model that shares layer shapes, costs no tuning time.

Candidates are built and timed where the code runs: on this host for the host, on the board over a
TVM RPC tracker for a remote board (MetaSchedule's ``RPCRunner``; the candidates are cross-compiled
with ``<triple>-g++``).

Needs ``apache-tvm-ffi`` 0.1.14 (0.1.15.x makes MetaSchedule segfault in ``ToJSONGraph``),
``psutil`` and ``xgboost`` (the ``xgboost-cpu`` wheel) - all in bitfold's ``tvm`` extra.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from bitfold.core.events import events_of
from bitfold.core.errors import BitfoldError, ToolMissingError


def db_dir(board_name: str, target) -> Path:
    from bitfold.core.paths import bitfold_home
    h = hashlib.sha256(str(target).encode()).hexdigest()[:10]
    return bitfold_home() / "tvm-tuning" / f"{board_name}-{h}"


def prepare(mod):
    """Legalize and fuse: the module whose kernels (PrimFuncs) are tuned and compiled."""
    import tvm
    from tvm import relax
    seq = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.LegalizeOps(),
                                    relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                    relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(["main"])])
    return seq(mod)


def check_deps():
    missing = []
    for mod, pip in (("psutil", "psutil"), ("xgboost", "xgboost-cpu")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pip)
    if missing:
        raise ToolMissingError(f"MetaSchedule tuning needs {', '.join(missing)}, which is not installed",
                               f"pip install {' '.join(missing)}  (or build with --tune-trials 0)")
    import tvm_ffi
    v = getattr(tvm_ffi, "__version__", "")
    if v.startswith("0.1.15"):
        raise ToolMissingError(f"apache-tvm-ffi {v} makes MetaSchedule crash (segfault in ToJSONGraph)",
                               "pip install apache-tvm-ffi==0.1.14.post0  (or build with --tune-trials 0)")


def _in_process_builder(cross: str | None, tmp: Path):
    """A MetaSchedule builder that compiles candidates in this process.

    MetaSchedule's ``LocalBuilder`` starts a fresh process pool for every batch (an upstream workaround for
    a worker memory leak); here that costs ~25 s per batch of 4 candidates that compile in 0.03 s each,
    and a short timeout then drops every candidate. Compiling in-process removes that fixed cost.
    """
    import tempfile

    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.ir.utils import derived_object
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    import tvm.s_tir.tensor_intrin  # noqa: F401 - registers the intrinsics candidates may use

    @derived_object
    class InProcessBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.n = 0

        def build(self, build_inputs):
            out = []
            for bi in build_inputs:
                try:
                    rt = tvm.compile(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(bi.mod), target=bi.target)
                    self.n += 1
                    own = Path(tempfile.mkdtemp(dir=tmp))  # MetaSchedule deletes each artefact's folder
                    if cross:
                        from tvm.support import cc
                        path = own / "cand.so"
                        rt.export_library(str(path), fcompile=cc.cross_compiler(cross))
                    else:
                        from tvm.support.tar import tar
                        path = own / f"cand.{tar.output_format}"
                        rt.export_library(str(path), fcompile=tar)
                    out.append(BuilderResult(str(path), None))
                except Exception as e:  # noqa: BLE001 - a candidate that does not compile is dropped
                    out.append(BuilderResult(None, f"{type(e).__name__}: {e}"[:500]))
            return out
    del ms
    return InProcessBuilder()


def _runner(tracker: str | None, key: str | None):
    from tvm.s_tir import meta_schedule as ms
    if tracker is None:
        return "local"
    from bitfold.export.tvm.rpc import parse_address
    host, port = parse_address(tracker)
    return ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                                   session_timeout_sec=120))


def tune(mod, target, work_dir: Path, trials: int, *, retune: bool = False, tracker: str | None = None,
         key: str | None = None, cross: str | None = None, events=None) -> dict:
    """Tune, with ``trials`` candidates each, the conv/matmul kernels of a prepared module that have no
    record in ``work_dir`` yet (all of them if ``retune``)."""
    check_deps()
    from tvm.s_tir import meta_schedule as ms
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_log.setLevel(logging.WARNING)
    # MetaSchedule re-lists this logger's handlers by name when it configures logging; an unnamed one
    # (left by an earlier tuning run in the same process) crashes it - it re-creates its own anyway
    ms_log.handlers.clear()
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    # the kernels worth a search: those holding a convolution or matmul (element-wise, pooling and
    # quantize kernels are memory-bound and keep the default schedule)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target)
             if any(k in t.task_name for k in ("conv2d", "matmul", "dense")) and "bitserial" not in t.task_name]
    todo = [t for t in tasks if retune or db.query_tuning_record(t.dispatched[0], target, "main") is None]
    info = {"kernels": len(tasks), "tuned_now": len(todo), "reused": len(tasks) - len(todo), "trials": 0,
            "database": str(work_dir)}
    if not todo or trials <= 0:
        return info
    per_task = trials
    ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, work_dir=str(work_dir))
    import tempfile
    cand_dir = Path(tempfile.mkdtemp(prefix="bf-ms-"))
    builder, runner = _in_process_builder(cross, cand_dir), _runner(tracker, key)
    events_of(events).say(f"tuning {len(todo)} kernel(s), {per_task} trial(s) each (MetaSchedule, database {work_dir})")
    try:
        ms.tune.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=str(work_dir),
                           max_trials_global=trials * len(todo),
                           max_trials_per_task=per_task, num_trials_per_iter=min(per_task, 32),
                           builder=builder, runner=runner, database=db)
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types
        raise BitfoldError(f"MetaSchedule tuning failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                           "build without tuning: --tune-trials 0") from e
    finally:
        import shutil
        shutil.rmtree(cand_dir, ignore_errors=True)
    info["trials"] = len(db.get_all_tuning_records())
    return info


def apply(mod, target, work_dir: Path):
    """Apply the best records of the database to the module's kernels (a no-op for kernels without one)."""
    import tvm
    from tvm import relax
    if not (Path(work_dir) / "database_tuning_record.json").exists():
        return mod, 0
    with target, tvm.transform.PassContext(opt_level=3):
        out = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(mod)
    applied = sum(1 for _, f in out.functions_items()
                  if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False)))
    return out, applied
