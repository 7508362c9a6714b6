"""FINN backend: QONNX -> finn-plus dataflow design for Xilinx boards, through a separate environment.

finn-plus 1.6.1 hard-pins onnx 1.21 / onnxruntime 1.25 / protobuf 5.29 / brevitas 0.13.0, which
cannot share bitfold's environment, so FINN lives in its own virtual environment
(``bitfold setup finn``) and is driven as a subprocess through a small versioned contract
(:mod:`bitfold.export.finn.worker`: a QONNX file + JSON request in, a build directory + JSON
result out). Nothing of FINN is imported into bitfold's process.

The environment holds finn-plus and its requirements *except brevitas* (FINN's own code never
imports it) and with the CPU torch 2.13 wheel (FINN's custom-op registry imports torch at module
level, for its LayerNorm op): no CUDA, no second torch download.

``bitfold build model.onnx --board pynq-z2|zcu104|ultra96-v2`` runs FINN's estimate flow (tidy-up,
streamline, convert to HW layers, partition, specialize, folding from a target FPS or a folding
file, estimate reports, HDL code generation). Without a rate it folds for 100,000 inferences/s, or, where
that does not fit the board, the fastest slower rate that does (:func:`rate_search`, over FINN's own
estimates); ``target_fps=0`` asks for the fastest rate that fits. The model is executed in Python after each of nine
steps, through partitioning, specialisation and folding, on held-out samples and compared with the
export under bitfold's float gate (rounding-boundary flips only); FINN's own single-sample checks
are recorded too. Matrix-vector units are built as FINN's LUT-based HLS MVAU by default (the style
the FINN boards' cost tables are measured in, so a table prices what the build builds; FINN's
DSP-based RTL MVAU is estimated at 0 LUT); ``impl_style="rtl"`` or ``"auto"`` (FINN chooses) change
that, and build.json records the style. FINN's generated RTL layers (thresholding, sliding window, padding, ...) are
linted and simulated in verilator under random back-pressure against the Python execution of the
same layer (exact on every sample, :mod:`bitfold.export.finn.rtlsim`); the DSP-based RTL MVAU
instantiates Xilinx primitives and is linted only. The steps after that (HLS IP generation,
cppsim, rtlsim, stitched IP, synthesis, bitstream, PYNQ driver) need Vivado / Vitis HLS: they run
when those tools are on PATH; otherwise the build keeps the estimate results and stops with one
message naming the tools.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bitfold.core.events import events_of
from bitfold.core.errors import BitfoldError, ToolMissingError
from bitfold.hw_models.finn_rules import DEFAULT_FPS

FINN_VERSION = "1.6.1"
CONTRACT = 1
WORKER = Path(__file__).with_name("worker.py")
#: finn-plus 1.6.1's requirements without brevitas (unused by FINN's code), cmake / pybind11 (only
#: for building FINN's XSI simulator bindings, which need Vivado) and the test extras; plus psutil
#: (used, undeclared), jinja2 (imported by finn.templates, undeclared) and the CPU torch wheel.
FINN_REQUIREMENTS = [
    "bitstring>=4.3.1,<4.4", "click>=8.1.8,<9", "mashumaro[yaml]>=3.15,<4", "matplotlib>=3.10.9,<3.11",
    "mip==1.17.0", "numpy>=2.4.6,<2.5", "onnx==1.21.0", "onnx-ir>=0.1.15", "onnx-passes>=0.4.0",
    "onnxoptimizer>=0.4.2,<0.5", "onnxruntime==1.25.1", "onnxscript>=0.7.0", "pandas>=2.3.1,<2.4",
    "protobuf==5.29.6", "pydantic>2", "pyyaml>=6.0.2,<6.1", "qonnx==1.0.0", "rich>=13.9.4,<14",
    "scikit-learn>=1.7.2,<1.8", "scipy>=1.17,<1.18", "termcolor>=2.5,<3", "psutil", "jinja2",
    "torch==2.13.0",
]
MARKER = "bitfold-finn-env.json"


def env_dir(env: str | Path | None = None) -> Path:
    """``--env``, else ``$BITFOLD_FINN_ENV``, else ``$BITFOLD_HOME/finn-env`` (``~/.cache/bitfold``)."""
    if env:
        return Path(env)
    if os.environ.get("BITFOLD_FINN_ENV"):
        return Path(os.environ["BITFOLD_FINN_ENV"])
    from bitfold.core.paths import bitfold_home
    return bitfold_home() / "finn-env"


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def env_ready(env: str | Path | None = None) -> bool:
    e = env_dir(env)
    return _python(e).exists() and (e / MARKER).exists()


def env_info(env: str | Path | None = None) -> dict:
    e = env_dir(env)
    if not env_ready(e):
        raise ToolMissingError(f"no FINN environment at {e}",
                               "run: bitfold setup finn   (one-time, ~2 min; or set BITFOLD_FINN_ENV)")
    return json.loads((e / MARKER).read_text())


def setup(env: str | Path | None = None, force: bool = False, events=None) -> dict:
    """Create (or reuse) the FINN environment and check that FINN's builder imports in it."""
    say = events_of(events).say
    e = env_dir(env)
    if env_ready(e) and not force:
        info = _check(e)
        say(f"FINN environment at {e} is ready (finn-plus {info.get('finn-plus')})")
        return info
    # the marker file is written last: an interrupted setup leaves no marker and is redone
    # (venvs are not relocatable, so the environment is built in place rather than renamed)
    shutil.rmtree(e, ignore_errors=True)
    e.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    say(f"creating the FINN environment in {e} (finn-plus {FINN_VERSION}, no brevitas, CPU torch) ...")
    _sh([sys.executable, "-m", "venv", str(e)], "python -m venv")
    pip = [str(_python(e)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _sh(pip + ["--no-deps", f"finn-plus=={FINN_VERSION}"], "pip install finn-plus")
    _sh(pip + FINN_REQUIREMENTS, "pip install FINN's requirements")
    info = _check(e)
    info["setup_s"] = round(time.time() - t, 1)
    (e / MARKER).write_text(json.dumps(info, indent=1))
    say(f"FINN environment ready in {info['setup_s']} s: finn-plus {info.get('finn-plus')}, "
        f"onnx {info.get('onnx')}, torch {info.get('torch')}, brevitas {info.get('brevitas') or 'not installed'}")
    return info


def _sh(cmd, what: str, cwd=None, timeout: float = 3600) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-8:])
        raise BitfoldError(f"{what} failed (exit {p.returncode}):\n{tail}")
    return p


def _check(e: Path) -> dict:
    p = subprocess.run([str(_python(e)), str(WORKER), "--check"], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-6:])
        raise BitfoldError(f"the FINN environment at {e} is broken:\n{tail}", "recreate it: bitfold setup finn --force")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_worker(request: dict, env: str | Path | None = None, timeout: float = 3600) -> dict:
    """Run one request through the FINN environment; returns the worker's result JSON."""
    e = env_dir(env)
    env_info(e)
    out = Path(request["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    req = out / "bitfold_request.json"
    req.write_text(json.dumps({"contract": CONTRACT, **request}, indent=1))
    p = subprocess.run([str(_python(e)), str(WORKER), str(req)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "FINN_BUILD_DIR": str(out / "finn_tmp")})
    (out / "finn_worker.log").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    res_path = out / "bitfold_result.json"
    if not res_path.exists():
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-8:])
        raise BitfoldError(f"the FINN worker exited {p.returncode} without a result:\n{tail}",
                           "check the FINN environment: bitfold setup finn --force")
    return json.loads(res_path.read_text())


def _inputs(model_path: Path, samples: int):
    """Held-out inputs (digits when the shape fits) and the exported model's outputs (qonnx)."""
    from bitfold.export.verify import held_out_inputs
    from bitfold.export.verify import run_qonnx
    import onnx
    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    inp = [i for i in m.graph.input if i.name not in inits][0]
    shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)[1:]
    x, src = held_out_inputs(shape, samples)
    y = run_qonnx(str(model_path), x)
    return x, np.where(np.abs(y) < 1e-6, 0.0, y).astype(np.float32), src   # FINN's rel. check trips on ±1e-9


def _check_qonnx(path: Path):
    from bitfold.export.onnx_io import load_onnx
    m = load_onnx(path)
    ops = {n.op_type for n in m.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        raise BitfoldError(f"{path} is a QCDQ file; FINN takes QONNX", "export with: bitfold export RUN --format qonnx")
    if not ops & {"Quant", "BipolarQuant"}:
        raise BitfoldError(f"{path} has no Quant nodes: FINN needs a quantized QONNX model",
                           "export a quantized run with --format qonnx")
    return m


def _step_checks(res: dict, ref: np.ndarray, step: float = 0.0) -> dict:
    """Compare each step's Python execution (all samples) with the export's outputs under the
    float-mode gate of bitfold's export verification (rounding-boundary flips of at most one
    output step, on at most 2 % of the samples)."""
    from bitfold.export.verify import compare
    out = {}
    for tag, path in (res.get("bitfold_verify") or {}).items():
        got = np.load(path).reshape(ref.shape)
        rep = compare("finn", tag, ref, got, step)
        out[tag] = {"samples": rep.samples, "max_abs_diff": rep.max_abs_diff, "outlier_fraction": rep.outlier_fraction,
                    "argmax_agreement": rep.argmax_agreement, "passed": rep.passed,
                    "summary": f"max |diff| {rep.max_abs_diff:.2g}, argmax {rep.argmax_agreement:.0%}"}
    return out


def summarize(res: dict, board) -> dict:
    """Per-layer table and totals vs the board's budget from FINN's estimate reports."""
    est = res.get("estimates", {})
    resources = est.get("estimate_layer_resources", {})
    cycles = est.get("estimate_layer_cycles", {})
    fold = res.get("folding") or est.get("auto_folding_config", {})
    rows = []
    for name, r in resources.items():
        if name == "total":
            continue
        f = fold.get(name, {})
        rows.append({"layer": name, "type": name.rsplit("_", 1)[0], "PE": f.get("PE", "-"), "SIMD": f.get("SIMD", "-"),
                     "LUT": float(r.get("LUT", 0)), "BRAM_18K": float(r.get("BRAM_18K", 0)),
                     "DSP": float(r.get("DSP", 0)), "URAM": float(r.get("URAM", 0)), "cycles": cycles.get(name)})
    tot = {k: sum(r[k] for r in rows) for k in ("LUT", "BRAM_18K", "DSP", "URAM")}
    budget = {"LUT": board.resources.get("lut"), "BRAM_18K": board.resources.get("bram18"),
              "DSP": board.resources.get("dsp"), "URAM": board.resources.get("uram", 0)}
    perf = est.get("estimate_network_performance", {})
    return {"layers": rows, "totals": tot, "budget": budget, "performance": perf,
            "fits": all(tot[k] <= (budget[k] or 0) for k in tot if tot[k])}


def markdown(summary: dict, board, res: dict) -> str:
    lines = [f"# bitfold FINN build: {board.name} ({board.part}, {board.clock_mhz:g} MHz) - FINN estimates", "",
             "| layer | type | PE | SIMD | LUT | BRAM18 | DSP | cycles |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["layers"]:
        lines.append(f"| {r['layer']} | {r['type']} | {r['PE']} | {r['SIMD']} | {r['LUT']:,.0f} | {r['BRAM_18K']:g} | "
                     f"{r['DSP']:g} | {r['cycles'] if r['cycles'] is not None else '-'} |")
    t, b = summary["totals"], summary["budget"]
    lines += ["", "| total | LUT | BRAM18 | DSP | URAM |", "|---|---|---|---|---|",
              f"| estimate | {t['LUT']:,.0f} | {t['BRAM_18K']:g} | {t['DSP']:g} | {t['URAM']:g} |",
              f"| {board.name} | {b['LUT'] or 0:,} | {b['BRAM_18K'] or 0} | {b['DSP'] or 0} | {b['URAM'] or 0} |"]
    p = summary["performance"]
    if p:
        lines += ["", f"estimated {p.get('estimated_throughput_fps', 0):,.0f} inferences/s, latency "
                      f"{p.get('estimated_latency_ns', 0) / 1000:.2f} us, bottleneck {p.get('max_cycles_node_name')} "
                      f"({p.get('max_cycles')} cycles)"]
    checks = res.get("_checks", {})
    lines += ["", "verification (Python execution after each step vs the exported model): "
              + "; ".join(f"{k} {'ok' if c['passed'] else 'FAILED'} ({c['samples']} samples, {c['summary']})"
                          for k, c in checks.items())]
    fv = res.get("verification", {})
    if fv:
        lines.append("FINN's own single-sample checks: " + ", ".join(f"{k} {'ok' if ok else 'differs'}"
                                                                    for k, ok in fv.items()))
    return "\n".join(lines) + "\n"


def rate_search(req: dict, env, board, work: Path, up: bool, say=None, steps: int = 3,
                known: tuple | None = None) -> tuple[int, list]:
    """The rate to build at when none was asked: FINN's own estimates (no verification, no HDL) at
    candidate rates. ``up`` (``--target-fps 0``): the fastest rate that fits the board, found by
    raising the rate 4x from the default while it fits and FINN still reaches it, then bisecting
    (geometric) ``steps`` times; where FINN cannot reach the asked rate (every lane used), the rate it
    reaches. Otherwise the default rate if it fits, else the fastest slower
    rate that fits (4x down, then bisecting). Returns (rate, [{fps, LUT, BRAM_18K, DSP, fits}]).
    Raises when nothing down to 1 inference/s fits. ``known``: the :func:`summarize` of a build at
    the default rate already made."""
    tried = []

    def record(fps, sm):
        reached = float(sm["performance"].get("estimated_throughput_fps", 0))
        budget = sm.get("budget") or {}
        tried.append({"fps": int(fps), **{k: sm["totals"][k] for k in ("LUT", "BRAM_18K", "DSP")},
                      "fits": sm["fits"], "reached_fps": reached,
                      "over": {k: [v, budget.get(k) or 0] for k, v in sm["totals"].items()
                               if v and v > (budget.get(k) or 0)}})
        return sm["fits"], reached

    def probe(fps):
        r = dict(req, target_fps=int(fps), out_dir=str((work / str(int(fps))).resolve()), codegen=False,
                 verify_samples=None, stage="estimate")
        res = run_worker(r, env)
        if res.get("status") == "error":
            raise _finn_error(res, Path(req["onnx"]))
        sm = summarize(res, board)
        if say:
            say(f"  rate {int(fps):,}/s: {sm['totals']['LUT']:,.0f} LUT, {'fits' if sm['fits'] else 'does not fit'}")
        return record(fps, sm)

    fits, reached = record(DEFAULT_FPS, known) if known is not None else probe(DEFAULT_FPS)
    if fits and not up:
        return DEFAULT_FPS, tried
    lo, hi = (DEFAULT_FPS, None) if fits else (None, DEFAULT_FPS)
    while fits and up and hi is None:          # faster while it fits and FINN still gets faster
        nxt = lo * 4
        if nxt > 1e9:
            break
        fits, reached = probe(nxt)
        if fits and reached < 0.5 * nxt:       # FINN cannot fold this fast: its fastest design fits
            return int(reached), tried
        lo, hi = (nxt, None) if fits else (lo, nxt)
    while lo is None:                           # slower until it fits
        nxt = hi // 4
        if nxt < 1:
            last = tried[-1]
            over = ", ".join(f"{v:,.0f} {k} of {b:,.0f}" for k, (v, b) in last["over"].items()) \
                or f"{last['LUT']:,.0f} LUT"
            raise BitfoldError(f"FINN's estimate does not fit {board.name} at any rate down to 1 inference/s "
                               f"(at {hi:,}/s: {over})",
                               "use a larger board or narrower widths (weights and thresholds live in block RAM)")
        fits, _ = probe(nxt)
        lo, hi = (nxt, hi) if fits else (None, nxt)
    for _ in range(steps if hi is not None else 0):
        mid = int(round((lo * hi) ** 0.5))
        if mid in (lo, hi):
            break
        fits, _ = probe(mid)
        lo, hi = (mid, hi) if fits else (lo, mid)
    return int(lo), tried


def build(onnx_path: Path, board, out_dir: Path, folding: str | Path | None = None, verify: bool = True,
          samples: int = 20, bitstream: bool = True, events=None, target_fps: float | None = None,
          env: str | Path | None = None, impl_style: str | None = "hls", rtl_sim: bool = True):
    """``bitfold build model.onnx --board pynq-z2``: see the module docstring."""
    from bitfold.core.atomic import write_json

    from bitfold.export.backends import BuildResult, staged_dir
    say = events_of(events).say
    onnx_path = Path(onnx_path)
    _check_qonnx(onnx_path)
    info = env_info(env)
    if folding is not None and not Path(folding).exists():
        raise BitfoldError(f"folding file {folding} does not exist")
    with staged_dir(out_dir) as tmp:
        finn_dir = tmp / "finn"
        x, y, src = _inputs(onnx_path, samples)
        np.save(tmp / "verify_input.npy", x[:1])
        np.save(tmp / "verify_output.npy", y[:1])
        np.savez(tmp / "verify_samples.npz", x=x, y=y)
        shutil.copyfile(onnx_path, tmp / "model.onnx")
        fps = None if folding else (DEFAULT_FPS if target_fps is None else int(target_fps))
        spec = None
        if impl_style not in (None, "auto", "hls", "rtl"):
            raise BitfoldError(f"unknown MVAU style {impl_style!r}", "choose hls (LUT-based, what the cost tables "
                                                                    "price), rtl (DSP-based) or auto (FINN chooses)")
        if impl_style in ("hls", "rtl"):   # the default "hls": LUT-based MVAUs, which the cost tables price
            spec = tmp / "specialize.json"
            spec.write_text(json.dumps({"Defaults": {"preferred_impl_style": [impl_style, ["MVAU"]]}}))
        req = {"onnx": str((tmp / "model.onnx").resolve()), "out_dir": str(finn_dir.resolve()), "part": board.part,
               "board": board.finn_board, "clock_mhz": board.clock_mhz, "target_fps": fps,
               "folding": str(Path(folding).resolve()) if folding else None,
               "stage": "bitstream" if bitstream else "estimate", "codegen": True,
               "specialize": str(spec.resolve()) if spec else None,
               "verify_input": str((tmp / "verify_input.npy").resolve()),
               "verify_output": str((tmp / "verify_output.npy").resolve()),
               "verify_samples": str((tmp / "verify_samples.npz").resolve()) if verify else None}
        say(f"FINN {info.get('finn-plus')} estimate flow for {board.part}")
        t = time.time()
        search = []
        if not folding and fps == 0:     # --target-fps 0: the fastest rate that fits the board
            fps, search = rate_search(req, env, board, tmp / "rate_search", up=True, say=say)
            req["target_fps"] = fps
        res = run_worker(req, env)
        first = summarize(res, board) if not folding and target_fps is None and res.get("status") != "error" else None
        if first is not None and not first["fits"]:
            # no rate asked and the default does not fit: the fastest slower rate that does
            say(f"the default {DEFAULT_FPS:,} inferences/s does not fit {board.name}: searching a slower rate")
            fps, search = rate_search(req, env, board, tmp / "rate_search", up=False, say=say, known=first)
            req["target_fps"] = fps
            shutil.rmtree(finn_dir, ignore_errors=True)
            res = run_worker(req, env)
        wall = round(time.time() - t, 1)
        if res.get("status") == "error":
            raise _finn_error(res, onnx_path)
        from bitfold.export.verify import output_step_of
        checks = _step_checks(res, y, output_step_of(onnx_path)) if verify else {}
        bad = [k for k, c in checks.items() if not c["passed"]]
        if verify and (bad or len(checks) < 9):
            raise BitfoldError(f"FINN's model differs from the export after {', '.join(bad) or 'some steps'}: "
                               + "; ".join(f"{k}: {c['summary']}" for k, c in checks.items()),
                               "this model does not survive FINN's streamlining; please report it with the .onnx")
        hw = checks.get("hw_generic")
        summary = summarize(res, board)
        lint = lint_rtl(res)
        if any(v["rc"] != 0 for v in lint.values()):
            bad_l = {k: v["tail"] for k, v in lint.items() if v["rc"] != 0}
            raise BitfoldError(f"verilator lint of FINN's generated RTL failed: {bad_l}")
        from bitfold.export.finn.rtlsim import simulate_rtl
        rtl_sim = simulate_rtl(res, finn_dir) if verify and rtl_sim else {}
        bad_s = {k: v["summary"] for k, v in rtl_sim.items() if v.get("passed") is False}
        if bad_s:
            raise BitfoldError(f"FINN's generated RTL differs from FINN's Python execution in verilator: {bad_s}",
                               "this is a FINN code-generation bug for this model; please report it with the .onnx")
        report = {"backend": "finn", "board": board.name, "part": board.part, "clock_mhz": board.clock_mhz,
                  "onnx": str(onnx_path), "finn": res.get("versions", {}), "steps": res.get("steps", []),
                  "verification": checks, "finn_single_sample_checks": res.get("verification"),
                  "hw_python_verification": hw, "inputs": src,
                  "target_fps": fps, "rate_search": search, "mvau_style": impl_style or "auto",
                  "folding_file": str(folding) if folding else None, "wall_s": wall,
                  **summary, "rtl_lint": lint, "rtl_sim": rtl_sim, "status": res.get("status"), "missing_tool": res.get("missing_tool")}
        write_json(tmp / "build.json", report)
        (tmp / "report.md").write_text(markdown(summary, board, {**res, "_checks": checks}))
        if not summary["fits"]:
            big = max(summary["layers"], key=lambda r: r["LUT"])
            over = [f"{k} {summary['totals'][k]:,.0f} > {summary['budget'][k] or 0:,}" for k in summary["totals"]
                    if summary["totals"][k] > (summary["budget"][k] or 0)]
            raise BitfoldError(f"FINN's estimate does not fit {board.name}: {', '.join(over)} (largest layer "
                               f"{big['layer']}: {big['LUT']:,.0f} LUT at PE={big['PE']}, SIMD={big['SIMD']})",
                               "lower --target-fps or use a folding file with smaller PE/SIMD")
    arts = {"report": str(Path(out_dir) / "report.md"), "finn_dir": str(Path(out_dir) / "finn")}
    p = summary["performance"]
    if lint:
        notes_lint = f"verilator lint of FINN's RTL layers ok: {', '.join(lint)}"
    notes = [f"FINN estimate: {summary['totals']['LUT']:,.0f} LUT, {summary['totals']['BRAM_18K']:g} BRAM18, "
             f"{summary['totals']['DSP']:g} DSP of {board.name}'s {board.resources.get('lut', 0):,} LUT; "
             f"{p.get('estimated_throughput_fps', 0):,.0f} inferences/s, {p.get('estimated_latency_ns', 0) / 1000:.2f} us"]
    if lint:
        notes.append(notes_lint)
    simmed = [k for k, v in rtl_sim.items() if v.get("passed")]
    if simmed:
        notes.append(f"verilator simulation of FINN's RTL layers exact on {rtl_sim[simmed[0]]['samples']} samples "
                     f"under random back-pressure: {', '.join(simmed)}")
    for k, v in rtl_sim.items():
        if v.get("skipped"):
            notes.append(f"{k} not simulated: {v['skipped']}")
    result = BuildResult(Path(out_dir), board.name, "finn", arts, verified=bool(verify), notes=notes)
    if res.get("status") == "tool_missing":
        raise ToolMissingError(
            f"FINN stopped at the Vivado boundary: {res['missing_tool']} not found. Produced so far in {out_dir}: "
            f"estimate reports (report.md, finn/report/), verified intermediate models (finn/intermediate_models/)",
            "install Vivado + Vitis HLS (2022.2 or newer), source settings64.sh, and rerun; or pass --no-bitstream "
            "to stop after the estimates")
    return result


def lint_rtl(res: dict) -> dict:
    """``verilator --lint-only`` on the HDL FINN generated for its RTL layers (no Vivado needed);
    modules are resolved from the FINN environment's finn-rtllib. Skipped without verilator."""
    import glob
    srcs = res.get("rtl_sources") or {}
    if not srcs:
        return {}
    try:
        from bitfold.export.tools import verilator_cmd
        vl = verilator_cmd()
    except ToolMissingError:
        return {k: {"rc": 0, "skipped": "verilator not installed", "tail": ""} for k in srcs}
    lib = res.get("finn_rtllib", "")
    ydirs = sorted({os.path.dirname(p) for p in glob.glob(f"{lib}/**/*.*v", recursive=True)
                    if "/sim/" not in p and "/tb" not in p})
    out = {}
    for node, files in srcs.items():
        top = [f for f in files if Path(f).stem == node]
        if not top:
            continue
        cmd = vl + ["--lint-only", "-Wno-fatal", "-Wno-lint", "-Wno-style", "--top-module", node,
                    *[f for f in files if "template" not in Path(f).name]] + [a for y in ydirs for a in ("-y", y)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(top[0]).parent, timeout=600)
        text = p.stdout + p.stderr
        out[node] = {"rc": p.returncode, "warnings": text.count("%Warning"),
                     "tail": "\n".join(text.strip().splitlines()[-4:]) if p.returncode else ""}
    return out


def _finn_error(res: dict, onnx_path: Path) -> BitfoldError:
    err = res.get("error", {})
    step, msg = err.get("step", "?"), err.get("message", "")
    non_hw = err.get("non_hw_nodes") or []
    if not non_hw and "unmapped nodes:" in msg:      # FINN's own FINNUserError lists them by name
        names = [n.strip() for n in msg.split("unmapped nodes:", 1)[1].split("->")[0].split(",") if n.strip()]
        non_hw = [f"{n.rsplit('_', 1)[0]} ({n})" for n in names]
    hint = "see finn_worker.log and finn/build_dataflow.log in the build directory"
    if non_hw:
        by_op: dict = {}
        for item in non_hw:
            op, name = item.split(" ", 1)
            by_op.setdefault(op, []).append(name.strip("()"))
        desc = ", ".join(f"{op} x{len(v)} (first {v[0]})" for op, v in sorted(by_op.items(), key=lambda kv: -len(kv[1])))
        return BitfoldError(f"FINN could not map {onnx_path.name} to hardware ({step}): layers left without a FINN HW "
                            f"implementation: {desc}",
                            "FINN needs chains of quantized Conv/MatMul + thresholded activations; residual adds, "
                            "unquantized layers and float ops between layers are not supported (use the TVM backend)")
    return BitfoldError(f"FINN failed in {step} on {onnx_path.name}: {msg}", hint)


def estimate(onnx_path, board_name: str, target_fps: int = DEFAULT_FPS, out_dir=None) -> dict:
    """FINN estimate totals for a QONNX file on a board (used by benchmarks); no verification."""
    import tempfile

    from bitfold.boards import load_board
    b = load_board(board_name)
    out = Path(out_dir or tempfile.mkdtemp(prefix="bitfold-finn-est-"))
    build(Path(onnx_path), b, out, verify=False, bitstream=False, target_fps=target_fps)
    return json.loads((out / "build.json").read_text())
