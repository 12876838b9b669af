"""MaSA benchmark: every vitattn backend against the RMT-style reference, SDPA with a
materialised float mask, and compiled FlexAttention with the Manhattan score_mod.

    python benchmarks/bench_masa.py [--quick] [--device cuda|cpu] [--dtype bf16|fp16|fp32]

Forward and forward+backward time (median ms) and the peak extra memory of one
forward+backward (MiB). Writes benchmarks/results/bench_masa.{md,json}.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vitattn  # noqa: E402
from vitattn.ops.masa.backends import dispatcher as masa_dispatcher  # noqa: E402
from vitattn.ops.masa.reference import axis_distance, manhattan_distance  # noqa: E402
from benchmarks.common import bench_device, cli, peak_memory_mb, time_fn  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ["form", "B", "heads", "H", "W", "N", "d", "dtype", "method", "fwd_ms", "fwd_bwd_ms", "peak_mib", "note"]


def cases(quick: bool, device: torch.device) -> List[Dict]:
    if device.type == "cuda" and not quick:
        rmt_s = [  # RMT-S at 224^2: stages 1-2 decomposed, 3-4 full
            dict(form="decomposed", B=128, heads=4, H=56, W=56, d=16),
            dict(form="decomposed", B=128, heads=4, H=28, W=28, d=32),
            dict(form="full", B=128, heads=8, H=14, W=14, d=32),
            dict(form="full", B=128, heads=16, H=7, W=7, d=32),
            dict(form="full", B=64, heads=4, H=28, W=28, d=32),
            dict(form="full", B=32, heads=4, H=32, W=32, d=64),
            dict(form="full", B=16, heads=4, H=56, W=56, d=32),
        ]
        detection = [
            dict(form="decomposed", B=2, heads=4, H=200, W=336, d=16),
            dict(form="full", B=2, heads=8, H=50, W=84, d=32),
        ]
        return rmt_s + detection
    if device.type == "cuda":
        return [dict(form="decomposed", B=32, heads=4, H=56, W=56, d=16),
                dict(form="full", B=32, heads=8, H=14, W=14, d=32)]
    if quick:
        return [dict(form="decomposed", B=2, heads=4, H=28, W=28, d=16),
                dict(form="full", B=2, heads=8, H=14, W=14, d=32)]
    return [
        dict(form="decomposed", B=4, heads=4, H=56, W=56, d=16),
        dict(form="full", B=4, heads=4, H=28, W=28, d=32),
        dict(form="full", B=1, heads=4, H=56, W=56, d=32),
        dict(form="full", B=8, heads=8, H=14, W=14, d=32),
    ]


# ---------------------------------------------------------------- baselines


def rmt_reference(q, k, v, log_g, decomposed):
    """The official RMT pattern: materialised (heads, N, N) fp32 mask added to the logits."""
    B, h, H, W, d = q.shape
    k = k * d ** -0.5
    if not decomposed:
        mask = manhattan_distance(H, W, q.device) * log_g[:, None, None]
        qk = q.reshape(B, h, H * W, d) @ k.reshape(B, h, H * W, d).transpose(-1, -2) + mask
        return (torch.softmax(qk, -1).to(v.dtype) @ v.reshape(B, h, H * W, -1)).reshape(B, h, H, W, -1)
    mask_w = axis_distance(W, q.device) * log_g[:, None, None]
    mask_h = axis_distance(H, q.device) * log_g[:, None, None]
    qk = q @ k.transpose(-1, -2) + mask_w[None, :, None]
    mid = torch.softmax(qk, -1).to(v.dtype) @ v
    qh, kh, mh = q.transpose(2, 3), k.transpose(2, 3), mid.transpose(2, 3)
    qk = qh @ kh.transpose(-1, -2) + mask_h[None, :, None]
    return (torch.softmax(qk, -1).to(v.dtype) @ mh).transpose(2, 3)


def sdpa_masked(q, k, v, log_g, decomposed):
    B, h, H, W, d = q.shape
    if not decomposed:
        mask = (manhattan_distance(H, W, q.device) * log_g[:, None, None]).to(q.dtype)
        o = F.scaled_dot_product_attention(q.reshape(B, h, H * W, d), k.reshape(B, h, H * W, d),
                                           v.reshape(B, h, H * W, -1), attn_mask=mask)
        return o.reshape(B, h, H, W, -1)
    mask_w = (axis_distance(W, q.device) * log_g[:, None, None]).to(q.dtype)[:, None]
    mask_h = (axis_distance(H, q.device) * log_g[:, None, None]).to(q.dtype)[:, None]
    mid = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_w)
    o = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), mid.transpose(2, 3), attn_mask=mask_h)
    return o.transpose(2, 3)


def sdpa_no_bias(q, k, v, log_g, decomposed):
    """Plain attention with no bias at all: the floor for the full form."""
    B, h, H, W, d = q.shape
    o = F.scaled_dot_product_attention(q.reshape(B, h, H * W, d), k.reshape(B, h, H * W, d), v.reshape(B, h, H * W, -1))
    return o.reshape(B, h, H, W, -1)


_FLEX_CACHE: Dict = {}


def flex_attention_fn(device) -> Optional[Callable]:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception:
        return None
    key = device.type
    if key not in _FLEX_CACHE:
        _FLEX_CACHE[key] = torch.compile(flex_attention, dynamic=False)
    compiled = _FLEX_CACHE[key]

    def run(q, k, v, log_g, decomposed):
        B, h, H, W, d = q.shape

        def manhattan(score, b, hh, qi, kj):
            dist = (qi // W - kj // W).abs() + (qi % W - kj % W).abs()
            return score + log_g[hh] * dist

        o = compiled(q.reshape(B, h, H * W, d), k.reshape(B, h, H * W, d), v.reshape(B, h, H * W, -1), score_mod=manhattan)
        return o.reshape(B, h, H, W, -1)

    return run


# ---------------------------------------------------------------- driver


def methods(case: Dict, device: torch.device, dtype: torch.dtype) -> Dict[str, Callable]:
    decomposed = case["form"] == "decomposed"
    out: Dict[str, Callable] = {}
    ctx = dict(device=device, dtype=dtype, d=case["d"], dv=case["d"], H=case["H"], W=case["W"], B=case["B"],
               heads=case["heads"], decomposed=decomposed)
    for name, can_run, _ in masa_dispatcher.explain(ctx):
        if can_run:  # every backend "auto" could pick here (not the Triton interpreter)
            out[f"vitattn:{name}"] = (lambda be: lambda q, k, v, g: vitattn.masa(q, k, v, g, decomposed=decomposed, backend=be))(name)
    out["rmt_reference"] = lambda q, k, v, g: rmt_reference(q, k, v, torch.log(g), decomposed)
    out["sdpa_float_mask"] = lambda q, k, v, g: sdpa_masked(q, k, v, torch.log(g), decomposed)
    if not decomposed:
        flex = flex_attention_fn(device)
        if flex is not None:
            out["flex_attention_compiled"] = lambda q, k, v, g: flex(q, k, v, torch.log(g), decomposed)
        out["sdpa_no_bias"] = lambda q, k, v, g: sdpa_no_bias(q, k, v, g, decomposed)
    return out


def run(quick: bool = True, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
        progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    device = bench_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    repeats = 3 if quick else 10
    rows = []
    for case in cases(quick, device):
        B, h, H, W, d = case["B"], case["heads"], case["H"], case["W"], case["d"]
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, h, H, W, d, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        gamma = torch.tensor([1 - 2 ** (-5 - 4 * i / h) for i in range(h)], device=device)
        dout = torch.randn_like(q)
        for name, fn in methods(case, device, dtype).items():
            if progress:
                progress(f"masa {case['form']} {H}x{W} {name}")
            row = dict(case, N=H * W, dtype=str(dtype).replace("torch.", ""), method=name, note="")
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

            def fwd():
                with torch.no_grad():
                    return fn(q, k, v, gamma)

            def fwd_bwd():
                o = fn(qg, kg, vg, gamma)
                o.backward(dout)

            try:
                row["fwd_ms"] = time_fn(fwd, device, repeats=repeats)
                row["fwd_bwd_ms"] = time_fn(fwd_bwd, device, repeats=repeats)
                row["peak_mib"] = peak_memory_mb(fwd_bwd, device)
            except Exception as exc:  # a baseline that cannot run here is reported, not hidden
                row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


def main(argv=None):
    cli("bench_masa", run, COLUMNS, __doc__, argv=argv,
        options=lambda ap: ap.add_argument("--dtype", default=None, choices=sorted(DTYPES)),
        run_kwargs=lambda args: dict(dtype=DTYPES.get(args.dtype), progress=lambda s: print(s, file=sys.stderr)))


if __name__ == "__main__":
    main()
