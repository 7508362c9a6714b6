"""Compiled single-pass kernels of the fused integer quantizer (``qkernels.c``), for float32 CPU tensors.

A fused quantizer (:mod:`bitfold.toolchain.fastquant`) still spends its time in separate tensor
operations - ``x / s``, ``round``, ``clamp``, ``* s`` forward and ten more backward - each a pass over
memory and a dispatch. :func:`forward` and :func:`backward` compute the same values, element by element
with the same single-precision operations in the same order, in one pass each; the reductions stay with
torch. The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``$BITFOLD_HOME/kernels`` (default ``~/.cache/bitfold/kernels``, keyed by the source, the flags and this
CPU) and loaded with ctypes; where no compiler works, :func:`available` is False, :func:`status` says
why and the fused quantizers run their torch operations (same results, slower).
``BITFOLD_QKERNELS=0`` turns the kernels off.

The fused quantizers' autograd nodes themselves (``qautograd.cpp``: forward and backward in C++, the
kernels above inside) are built the same way with the C++ compiler (``$CXX``, else ``c++``) against the
installed torch and loaded as the operators ``torch.ops.bitfold_q``: :func:`ops` returns them, or None
(:func:`status` says why) where no C++ compiler works - the Python autograd Functions then run, with
the same results (``BITFOLD_QNODES=0`` turns the C++ nodes off).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("qkernels.c")
#: no -ffast-math (it would reorder and contract the float operations); -ffp-contract=off: no fused
#: multiply-adds the tensor operations do not make
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]

_lib: ctypes.CDLL | None = None
_why: str | None = None
_SRC_OPS = Path(__file__).with_name("qautograd.cpp")
_ops = None            # torch.ops.bitfold_q once loaded
_ops_why: str | None = None
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _cpu_key() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _cache_dir() -> Path:
    home = os.environ.get("BITFOLD_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "bitfold") / "kernels"


def _build(cmd: list[str], sources: list[Path], name: str, extra_key: str = "", libs: tuple = ()) -> Path:
    """``cmd`` + ``-o <lib>`` + the first source + ``libs``, compiled once into the cache (keyed by the sources,
    the command, ``extra_key`` and this CPU); the path of the shared library."""
    blob = b"".join(p.read_bytes() for p in sources) + " ".join([*cmd, *libs]).encode() + extra_key.encode()
    key = hashlib.sha256(blob + _cpu_key().encode()).hexdigest()[:16]
    out = _cache_dir() / key / name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([*cmd, "-o", tmp, str(sources[0]), *libs], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {(r.stderr or r.stdout).strip()[:300]}")
        os.replace(tmp, out)      # whole or not at all: another process may be loading it
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _compile() -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    return _build([cc, *FLAGS], [_SRC], "libbfq.so")


def _compile_ops() -> Path:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    root = Path(torch.__file__).parent
    cmd = [cxx, *FLAGS, "-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
           f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}"]
    # the libraries after the source: a linker with --as-needed drops those named before their users
    return _build(cmd, [_SRC_OPS, _SRC], "libbfqop.so", torch.__version__, ("-ltorch", "-ltorch_cpu", "-lc10"))


def ops():
    """``torch.ops.bitfold_q`` (the fused quantizers' autograd nodes in C++, compiled on first call),
    or None where they cannot be built or the kernels are off (:func:`status` says why)."""
    global _ops, _ops_why
    if not (_enabled and _nodes):
        return None
    if _ops is not None or _ops_why is not None:
        return _ops
    if _load() is None:
        _ops_why = _why
        return None
    if os.environ.get("BITFOLD_QNODES", "1") == "0":
        _ops_why = "turned off (BITFOLD_QNODES=0)"
        return None
    try:
        torch.ops.load_library(str(_compile_ops()))
        _ops = torch.ops.bitfold_q
    except (OSError, RuntimeError) as e:
        _ops_why = str(e)
    return _ops


def _load() -> ctypes.CDLL | None:
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    if os.environ.get("BITFOLD_QKERNELS", "1") == "0":
        _why = "turned off (BITFOLD_QKERNELS=0)"
        return None
    try:
        lib = ctypes.CDLL(str(_compile()))
        lib.bfq_forward.argtypes = [_P, _P, _I, _I, _P, ctypes.c_int, _P, ctypes.c_int, _F, _F, ctypes.c_int]
        lib.bfq_forward.restype = None
        lib.bfq_backward.argtypes = [_P, _P, _I, _I, _P, ctypes.c_int, _P, ctypes.c_int, _F, _F, ctypes.c_int,
                                     ctypes.c_int, _P, _P, _P]
        lib.bfq_backward.restype = None
        lib.bfq_backward_range.argtypes = [_P, _P, _I, _I, _P, ctypes.c_int, _F, _F, ctypes.c_int, _P, _P, _P, _P, _P]
        lib.bfq_backward_range.restype = None
        lib.bfq_bucketize.argtypes = [_P, _I, _P, _I, _P]
        lib.bfq_bucketize.restype = ctypes.c_int
        lib.bfq_codebook_delta.argtypes = [_P, _I, _P, _I, _P]
        lib.bfq_codebook_delta.restype = ctypes.c_int
        lib.bfq_codebook_ema.argtypes = [_P, _I, _P, _I, _F, _F, ctypes.c_int]
        lib.bfq_codebook_ema.restype = ctypes.c_int
        lib.bfq_add_ties.argtypes = [_P, _P, _I, _F, _F]
        lib.bfq_add_ties.restype = None
        lib.bfq_add_at_rows.argtypes = [_P, _P, _I, _I, _P, _P]
        lib.bfq_add_at_rows.restype = None
        _lib = lib
    except (OSError, RuntimeError) as e:
        _why = str(e)
    return _lib


_enabled = True


def set_enabled(on: bool) -> bool:
    """Use the kernels (True, the default) or the tensor operations; returns the previous setting
    (benchmarks time both paths side by side in one process)."""
    global _enabled
    prev, _enabled = _enabled, bool(on)
    return prev


_nodes = True


def set_nodes_enabled(on: bool) -> bool:
    """Use the C++ autograd nodes (True, the default) or the Python Functions around the kernels;
    returns the previous setting (benchmarks time both in one process)."""
    global _nodes
    prev, _nodes = _nodes, bool(on)
    return prev


def ops_for(x: torch.Tensor):
    """:func:`ops` for a CPU float32 tensor outside torch.compile (dynamo does not trace into the C++
    nodes), else None - the caller's Python Function runs then."""
    if not x.is_cpu or x.dtype is not torch.float32 or torch.compiler.is_compiling():
        return None
    return ops()


def available() -> bool:
    """True when the compiled kernels are loaded (compiling them on first call) and enabled."""
    return _enabled and _load() is not None


def status() -> str:
    """One line: the kernels in use, or why the torch operations run instead."""
    if not _enabled:
        return "compiled quantizer kernels: off (set_enabled(False))"
    if not available():
        return f"compiled quantizer kernels: off ({_why})"
    if not _nodes:
        return "compiled quantizer kernels: on, autograd nodes in Python (set_nodes_enabled(False))"
    return "compiled quantizer kernels: on, autograd nodes in C++" if ops() is not None else \
        f"compiled quantizer kernels: on, autograd nodes in Python ({_ops_why})"


def standard(t: torch.Tensor) -> bool:
    """Row-major strides on every dimension, those of size 1 included. ``is_contiguous`` ignores the
    stride of a size-1 dimension; the tensor operations do not: a (64, 1, 8, 8) image batch with
    channels-last strides makes their outputs (and every convolution after them) channels-last, while
    an output allocated in row-major order would not - so only row-major tensors take the kernels,
    whose outputs are row-major as the operations' are then."""
    expect = 1
    for n, st in zip(reversed(t.shape), reversed(t.stride())):
        if st != expect:
            return False
        expect *= n
    return True


def grad_fits(g: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the backward kernels take the gradient ``g`` of an input ``x`` that :func:`layout`
    took: float32, ``x``'s shape, row-major (else the caller's tensor operations run, whose products
    then follow g's layout)."""
    return g.dtype == torch.float32 and g.shape == x.shape and standard(g)


def layout(x: torch.Tensor, s: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, inner, per_row) when the kernels take ``x`` with scale ``s`` - float32, CPU, row-major,
    ``s`` one value or one per row of ``x`` (shape (rows, 1, ...)) and no larger than ``x`` - else
    None (the caller runs the tensor operations)."""
    if x.dtype != torch.float32 or s.dtype != torch.float32 or x.device.type != "cpu" or s.device.type != "cpu" \
            or not standard(x) or x.dim() == 0 or s.dim() > x.dim() or torch.compiler.is_compiling() or not available():
        return None
    n = x.numel()
    if s.numel() == 1:
        return 1, n, 0
    if s.dim() == x.dim() and s.shape[0] == x.shape[0] and s.numel() == x.shape[0] and s.is_contiguous():
        return x.shape[0], n // x.shape[0], 1
    return None


def forward(x: torch.Tensor, s: torch.Tensor, lay: tuple[int, int, int], lo: float, hi: float,
            relu: bool, sm: torch.Tensor | None = None, per_row_m: int = 0) -> torch.Tensor:
    """``clamp(round(r / s), lo, hi) * s`` with ``r = relu(x)`` (``relu``) or ``x``; ``lay`` from
    :func:`layout`; ``sm``: a different scale to multiply by (ASQ: ``x / (s * beta)``, times ``s``),
    one value (``per_row_m`` 0) or one per row."""
    out = torch.empty_like(x)       # x is row-major: so is its copy (the operations' output layout)
    rows, inner, per_row = lay
    m, pm = (s, per_row) if sm is None else (sm, per_row_m)
    _lib.bfq_forward(x.data_ptr(), out.data_ptr(), rows, inner, s.data_ptr(), per_row, m.data_ptr(), pm, lo, hi, int(relu))
    return out


def backward(x: torch.Tensor, g: torch.Tensor, s: torch.Tensor, lay: tuple[int, int, int], lo: float, hi: float,
             relu: bool, mask: int, need_x: bool, need_s: bool, sm: torch.Tensor | None = None, per_row_m: int = 0):
    """(grad_x or None, (g * c, gc * (y / s)) or None) of :func:`forward`: ``gc = g * s`` (``g * sm``)
    cut where the rounded value is above ``hi`` (``mask`` >= 1) or below ``lo`` (``mask`` 2),
    ``grad_x = gc / s`` (0 where ``x <= 0`` under ``relu``); an integer quantizer's scale gradient is
    the difference of the two products' sums to the scale's shape."""
    if not grad_fits(g, x):
        raise ValueError("qkernels.backward: the gradient must be a row-major float32 tensor of the input's shape")
    gx = torch.empty_like(x) if need_x else None
    p1 = torch.empty_like(x) if need_s else None
    p2 = torch.empty_like(x) if need_s else None
    rows, inner, per_row = lay
    m, pm = (s, per_row) if sm is None else (sm, per_row_m)
    _lib.bfq_backward(x.data_ptr(), g.data_ptr(), rows, inner, s.data_ptr(), per_row, m.data_ptr(), pm, lo, hi,
                      int(relu), mask,
                      gx.data_ptr() if gx is not None else None, p1.data_ptr() if p1 is not None else None,
                      p2.data_ptr() if p2 is not None else None)
    return gx, (p1, p2) if need_s else None


def add_max_gradient(gx: torch.Tensor, w: torch.Tensor, at_max: torch.Tensor, gs: torch.Tensor,
                     per_channel: bool) -> bool:
    """The max-abs weight statistic's gradient ``gs`` added into ``gx`` in place, as autograd routes
    it - per output channel to the element ``torch.max`` returned (``at_max``, the indices), per tensor
    spread evenly over the elements whose ``|w|`` equals the maximum (``at_max``, the value), each
    times ``sgn(w)``; False (nothing done) where the tensors do not suit the kernels."""
    if not (available() and standard(gx) and standard(w) and gx.dtype == w.dtype == gs.dtype == torch.float32
            and gx.shape == w.shape and gx.device.type == "cpu" and w.device.type == "cpu"):
        return False
    if per_channel:
        at = at_max.contiguous()
        g = gs.reshape(-1).contiguous()
        if at.dtype != torch.int64 or at.numel() != w.shape[0] or g.numel() != w.shape[0]:
            return False
        _lib.bfq_add_at_rows(gx.data_ptr(), w.data_ptr(), w.shape[0], w.numel() // w.shape[0], at.data_ptr(), g.data_ptr())
    else:
        _lib.bfq_add_ties(gx.data_ptr(), w.data_ptr(), w.numel(), float(at_max), float(gs.reshape(())))
    return True


def backward_range(x: torch.Tensor, g: torch.Tensor, s: torch.Tensor, lay: tuple[int, int, int], lo: float, hi: float,
                   relu: bool, ste: bool, need_x: bool, need_s: bool, need_hi: bool = True, need_lo: bool = True):
    """(grad_x, (g * c, gq * (y / s)) or None, above, below) of :func:`forward` with learned bounds:
    ``gq = g * s`` cut outside [lo, hi] unless ``ste``; ``above`` / ``below``: ``g * s`` where the
    rounded value is above ``hi`` / below ``lo``, else 0 (the bounds' gradients are their sums; None
    under ``ste``). What is not needed is None and not computed."""
    if ste:
        gx, prods = backward(x, g, s, lay, lo, hi, relu, 0, need_x, need_s)
        return gx, prods, None, None
    if not grad_fits(g, x):
        raise ValueError("qkernels.backward_range: the gradient must be a row-major float32 tensor of the input's shape")
    out = [torch.empty_like(x) if want else None for want in (need_x, need_s, need_s, need_hi, need_lo)]
    rows, inner, per_row = lay
    _lib.bfq_backward_range(x.data_ptr(), g.data_ptr(), rows, inner, s.data_ptr(), per_row, lo, hi, int(relu),
                            *(t.data_ptr() if t is not None else None for t in out))
    gx, p1, p2, above, below = out
    return gx, ((p1, p2) if need_s else None), above, below


def bucketize(w: torch.Tensor, mids: torch.Tensor) -> torch.Tensor | None:
    """``torch.bucketize(w, mids)`` (ascending ``mids``; ties go left) as one compiled pass, or None
    where the tensors do not suit the kernels."""
    if not (available() and w.dtype == mids.dtype == torch.float32 and w.device.type == mids.device.type == "cpu"
            and mids.dim() == 1 and mids.numel() > 0):
        return None
    w, mids = w.contiguous(), mids.contiguous()
    out = torch.empty(w.shape, dtype=torch.int64)
    if mids.numel() >= 2 ** 30 or _lib.bfq_bucketize(w.data_ptr(), w.numel(), mids.data_ptr(), mids.numel(), out.data_ptr()):
        return None
    return out


def _codebook_fits(w: torch.Tensor, codebook: torch.Tensor) -> bool:
    return (available() and w.dtype == codebook.dtype == torch.float32 and w.device.type == "cpu"
            and codebook.device.type == "cpu" and codebook.dim() == 1 and 2 <= codebook.numel() <= 4096
            and codebook.is_contiguous())


def codebook_delta(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor | None:
    """``codebook[assign(w, codebook)] - w`` (ADQ's snap to the nearest entry, ties to the lower one) as
    one pass, or None where the kernels do not take the tensors or the codebook is not ascending (the
    caller runs the tensor operations)."""
    if not _codebook_fits(w, codebook):
        return None
    w = w.detach().contiguous()
    out = torch.empty_like(w)
    if _lib.bfq_codebook_delta(w.data_ptr(), w.numel(), codebook.data_ptr(), codebook.numel(), out.data_ptr()):
        return None
    return out


def codebook_ema(w: torch.Tensor, codebook: torch.Tensor, momentum: float, keep_zero: bool) -> bool:
    """ADQ's codebook update in place (the tensor operations of ``CodebookWeight.ema_update``: each
    entry with weights moves to ``momentum * c + (1 - momentum) * mean``, entries at 0 stay under
    ``keep_zero``, then sorted), in one pass over ``w``; False (nothing changed) where the kernels do
    not take the tensors, the codebook is not ascending or an entry would become NaN."""
    if not _codebook_fits(w, codebook):
        return False
    w = w.detach().contiguous()
    return _lib.bfq_codebook_ema(w.data_ptr(), w.numel(), codebook.data_ptr(), codebook.numel(), float(momentum),
                                 float(1 - momentum), int(keep_zero)) == 0
