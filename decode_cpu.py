"""
The fused CPU decode attention (decode_cpu.c): compiled once per machine with the system's C compiler, called
through ctypes on the tensors of a ZipLayerView as ZipCache stores them. Never required: where no compiler is
found, or the build fails, library() returns None, one line says so, and decode_kernel falls back to its torch path.
ZIPCACHE_CPU_KERNEL=0 turns it off (the torch path then runs, as kernel="torch" does).

Why C and not torch.compile: the decode step reads ~4k rows of packed codes per head; eager torch spends ~100
dispatches and several full-size float copies on them, and inductor's code for the fused gathers ran slower than
eager here (experiments/LOG.md). A loop that folds the scales into q once per key group and then reads each packed
byte once is what the paper's speed claim needs on a CPU.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "decode_cpu.c")
# -O3 and the machine's vector width; reassociation lets the dot products vectorize (the sums' order then differs
# from a sequential loop by fp32 rounding, as any blocked GEMM's does); no -ffast-math: exp/log/INFINITY stay IEEE
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-shared", "-fPIC"]
_LIB = None          # the loaded library, False once a build has failed (one message, no retries)
i64, ptr = ctypes.c_int64, ctypes.c_void_p


class Segment(ctypes.Structure):   # decode_cpu.c's Segment, field for field
    _fields_ = [("bits", i64), ("v_bits", i64), ("nested", i64), ("k_codes", ptr), ("v_codes", ptr),
                ("c_sb", i64), ("c_sh", i64), ("c_st", i64), ("w_sb", i64), ("w_sh", i64), ("w_st", i64),
                ("v_scale", ptr), ("v_min", ptr),
                ("v_sb", i64), ("v_sh", i64), ("v_st", i64), ("rows", ptr), ("r_sb", i64),
                ("k_stat", ptr), ("k_base", ptr), ("k_scale", ptr), ("k_min", ptr),
                ("s_sb", i64), ("s_sk", i64), ("s_sh", i64), ("b_sb", i64), ("b_sp", i64), ("b_sh", i64), ("b_s4", i64)]


class Layer(ctypes.Structure):     # decode_cpu.c's Layer
    _fields_ = [("B", i64), ("H", i64), ("G", i64), ("D", i64), ("n_blocks", i64), ("n_buf", i64),
                ("q", ptr), ("parent", ptr), ("v_chan", ptr), ("vc_sb", i64), ("vc_sp", i64), ("vc_sh", i64),
                ("k_buf", ptr), ("v_buf", ptr), ("kb_sb", i64), ("kb_sh", i64), ("kb_st", i64),
                ("out", ptr), ("lse", ptr), ("seg", Segment * 2)]


def _cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "zipcache-decode-cpu")


def library():
    """The compiled decode_cpu.c (built on first use, then reused from ~/.cache), or None where it cannot be."""
    global _LIB
    if _LIB is None:
        _LIB = False
        if os.environ.get("ZIPCACHE_CPU_KERNEL", "1") == "0":
            return None
        try:
            _LIB = _load()
        except (OSError, subprocess.SubprocessError) as e:
            print(f"decode_cpu: the fused CPU decode is not available ({str(e).splitlines()[0][:160]}); using the "
                  f"slower torch path (install a C compiler, e.g. gcc, to get it)", file=sys.stderr)
    return _LIB or None


def _load():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise OSError("no C compiler found (cc, gcc or clang on PATH, or $CC)")
    with open(SOURCE, "rb") as f:
        src = f.read()
    # -march=native: the library is specific to this machine, so the machine is part of its name
    key = hashlib.sha256(b"\0".join([src, " ".join([cc, *FLAGS]).encode(), platform.machine().encode(),
                                      platform.node().encode(), platform.processor().encode()])).hexdigest()[:16]
    lib = os.path.join(_cache_dir(), f"decode_cpu-{key}.so")
    if not os.path.exists(lib):
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(fd)
        try:   # a temporary name, then one rename: a half-written library is never loaded
            r = subprocess.run([cc, *FLAGS, SOURCE, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
            if r.returncode:
                raise OSError(f"{cc} failed: {(r.stderr or r.stdout).strip()}")
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    dll = ctypes.CDLL(lib)
    dll.zip_decode.argtypes = [ctypes.POINTER(Layer)]
    dll.zip_decode.restype = ctypes.c_int
    return dll


def supports(q, view):
    """Whether decode(q, view) can run: CPU tensors, fp32/fp16/bf16 queries (fp64 stays on the torch path, which
    computes in fp64), head size and query group within the C file's fixed arrays, last dims contiguous."""
    if q.device.type != "cpu" or q.dtype == torch.float64 or q.shape[-1] > 256 or q.shape[1] // view.k_buf.shape[1] > 64:
        return False
    halves = [view.v_chan, view.k_buf, view.v_buf] + [t for s in view.segments for t in
                                                       (s.v_scale, s.v_min, s.k_base, s.k_scale, s.k_min) if t is not None]
    if any(t.dtype != torch.float16 for t in halves) or view.k_buf.stride() != view.v_buf.stride():
        return False
    for s in view.segments:                  # pairs read with one set of strides, rows of bytes contiguous
        if s.k_codes.stride()[-1] != 1 or s.v_codes.stride()[-1] != 1 or \
                s.v_scale.stride() != s.v_min.stride() or (s.k_stat is None and s.k_scale.stride() != s.k_min.stride()):
            return False
    return library() is not None


def _strides(t, dims):
    """t's strides (elements) over dims; 0 over a dim of size 1, which is then broadcast (pooled statistics: Bs = 1;
    one value scale per row: Hv = 1)."""
    return [0 if t.shape[d] == 1 else t.stride(d) for d in dims]


def decode(qs, view):
    """qs fp32 [B, H_kv, G, D] (softmax scale folded in), a view that supports() accepts -> (out fp32
    [B, H_kv, G, D], lse fp32 natural log [B, H_kv, G]). The tensors are read where they are; none of them is copied
    or expanded (only the small int32 row and parent tables, when stored in another integer type)."""
    B, H, G, D = qs.shape
    qs = qs.contiguous()
    out = torch.empty(B, H, G, D)
    lse = torch.empty(B, H, G)
    nb = view.n_blocks
    keep = [qs]                                                     # what must outlive the call
    parent = None
    if view.parent is not None:
        parent = view.parent[:nb].to(torch.int32).contiguous()
        keep.append(parent)
    segs = []
    for s in view.segments:
        rows = s.rows.to(torch.int32).contiguous()
        keep.append(rows)
        nested = s.k_stat is not None
        st = s.k_stat if nested else s.k_scale
        seg = Segment(bits=s.bits, v_bits=s.vbits, nested=int(nested), k_codes=s.k_codes.data_ptr(),
                      v_codes=s.v_codes.data_ptr(), v_scale=s.v_scale.data_ptr(), v_min=s.v_min.data_ptr(), rows=rows.data_ptr(),
                      r_sb=rows.stride(0) if rows.shape[0] > 1 else 0)
        seg.c_sb, seg.c_sh, seg.c_st = _strides(s.k_codes, (0, 1, 2))
        seg.w_sb, seg.w_sh, seg.w_st = _strides(s.v_codes, (0, 1, 2))
        seg.v_sb, seg.v_sh, seg.v_st = _strides(s.v_scale, (0, 1, 2))
        if nb:
            seg.s_sb, seg.s_sk, seg.s_sh = _strides(st, (0, 1, 2))
        if nested:
            seg.k_stat, seg.k_base = s.k_stat.data_ptr(), s.k_base.data_ptr()
            seg.b_sb, seg.b_sp, seg.b_sh, seg.b_s4 = _strides(s.k_base, (0, 1, 2, 3))
        elif nb:
            seg.k_scale, seg.k_min = s.k_scale.data_ptr(), s.k_min.data_ptr()
        segs.append(seg)
    L = Layer(B=B, H=H, G=G, D=D, n_blocks=nb, n_buf=view.n_buf, q=qs.data_ptr(),
              parent=parent.data_ptr() if parent is not None else None, v_chan=view.v_chan.data_ptr(),
              k_buf=view.k_buf.data_ptr(), v_buf=view.v_buf.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
              seg=(Segment * 2)(*segs))
    L.vc_sb, L.vc_sp, L.vc_sh = _strides(view.v_chan, (0, 1, 2))
    L.kb_sb, L.kb_sh, L.kb_st = view.k_buf.stride()[:3]
    rc = library().zip_decode(ctypes.byref(L))
    if rc:
        raise RuntimeError(f"decode_cpu.zip_decode returned {rc} (out of memory?)")
    return out, lse
