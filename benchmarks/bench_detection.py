"""Benchmark: RMT-T as a detection backbone at 800x1344, stage 3 full vs decomposed MaSA.

The official RMT-T detection / segmentation configuration runs stage 3 (``layers[2]``, 8
blocks, 8 heads, 50 x 84 = 4200 tokens at 800x1344) as full MaSA; the official code builds a
dense (heads, N, N) decay mask and (B, heads, N, N) logits and probabilities per block.
vitattn.masa needs memory linear in N in both forms. Rows (CPU, fp32, batch 1, one thread;
every measurement in a fresh process, so that its peak resident memory is its own):

* ``backbone infer``: the whole RMT-T backbone (features_only) at 800x1344 under no_grad;
  ``peak_rss_mib`` is the process's peak resident memory (weights, imports included);
* ``stage3 infer`` / ``stage3 train``: stage 3 alone (RMT-T's widths, 8 blocks) on its token
  grid at the given resolution: no_grad forward, or forward + backward (input gradient);
  ``grew_mib`` is the growth of the peak resident memory over the process before the call.

``--official DIR`` (a folder outside this repository holding the official backbone importable
as ``mmdet.models.backbones.RMT`` with stand-ins for what it imports) adds the same rows for
the official code; each worker runs under an address-space limit (``--mem-limit-gib``) so that
what does not fit is reported as out of memory instead of taking the machine's memory.

    python benchmarks/bench_detection.py                  # vitattn rows
    python benchmarks/bench_detection.py --official ~/.cache/official/shim
    python benchmarks/bench_detection.py --quick          # 400x672, stage 3 only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cli  # noqa: E402

COLUMNS = ["impl", "what", "stage3", "res", "tokens_stage3", "status", "time_s", "peak_rss_mib", "grew_mib", "note"]

RMT_T = dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 8, 2], num_heads=[4, 4, 8, 16], init_values=[2, 2, 2, 2],
             heads_ranges=[4, 4, 6, 6], mlp_ratios=[3, 3, 3, 3], drop_path_rate=0.1,
             layerscales=[False, False, False, False])

_WORKER = textwrap.dedent("""
    import json, resource, sys, time
    cfg = json.loads(sys.argv[1])
    if cfg["limit_gib"]:
        lim = int(cfg["limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    chunk = [True, True, cfg["stage3"] == "decomposed", False]
    if cfg["impl"] == "official":
        sys.path.insert(0, cfg["official"])
        from mmdet.models.backbones.RMT import RMT
        model = RMT(**cfg["model"], chunkwise_recurrents=chunk)
    else:
        import vitattn.models.rmt as rmt
        model = rmt.RMT(**cfg["model"], chunkwise_recurrents=chunk, attn_backend=cfg["backend"])
    H, W = cfg["res"]
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        if cfg["what"] == "backbone infer":
            model.eval()
            x = torch.randn(1, 3, H, W)
            base = rss()
            t = time.perf_counter()
            with torch.no_grad():
                model(x)
        else:
            stage = model.layers[2]
            h, w = -(-H // 16), -(-W // 16)
            x = torch.randn(1, h, w, cfg["model"]["embed_dims"][2], requires_grad=cfg["what"] == "stage3 train")
            if cfg["impl"] == "official":
                run_blocks = lambda x: stage(x)[0]  # the official stage returns (x_out, x_down)
                stage.downsample = None
            else:
                run_blocks = stage.forward_blocks
            base = rss()
            t = time.perf_counter()
            if cfg["what"] == "stage3 train":
                stage.train()
                run_blocks(x).square().mean().backward()
            else:
                stage.eval()
                with torch.no_grad():
                    run_blocks(x)
        print(json.dumps(dict(status="ok", time_s=time.perf_counter() - t, peak_rss_mib=rss(), grew_mib=rss() - base)))
    except (MemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        print(json.dumps(dict(status=f"out of memory (address space limit {cfg['limit_gib']} GiB)",
                              peak_rss_mib=rss(), note=str(exc).splitlines()[0][:120])))
""")


def _measure(impl: str, what: str, stage3: str, res, *, official: Optional[str], backend: str,
             limit_gib: float) -> Dict:
    cfg = dict(impl=impl, what=what, stage3=stage3, res=list(res), model=RMT_T, official=official, backend=backend,
               limit_gib=limit_gib)
    row = dict(impl="official" if impl == "official" else f"vitattn:{backend}", what=what, stage3=stage3,
               res=f"{res[0]}x{res[1]}", tokens_stage3=-(-res[0] // 16) * -(-res[1] // 16))
    out = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        killed = out.returncode < 0 or "MemoryError" in out.stderr or "memory" in last.lower()
        row.update(status=f"out of memory (address space limit {limit_gib} GiB)" if killed else "error",
                   note=last[:160])
        return row
    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return row


def run(quick: bool, device: torch.device, official: Optional[str] = None, backend: str = "auto",
        mem_limit_gib: float = 16.0) -> List[Dict]:
    if device.type != "cpu":
        raise SystemExit("bench_detection: CPU only (the numbers are peak resident memory of CPU processes)")
    det, train = ((400, 672), (256, 432)) if quick else ((800, 1344), (512, 864))
    plan = [] if quick else [("backbone infer", det)]
    plan += [("stage3 infer", det), ("stage3 train", train), ("stage3 train", det)]
    impls = ["vitattn"] + (["official"] if official else [])
    rows = []
    for what, res in plan:
        for stage3 in ("full", "decomposed"):
            for impl in impls:
                row = _measure(impl, what, stage3, res, official=official, backend=backend, limit_gib=mem_limit_gib)
                print(row, file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def _options(ap) -> None:
    ap.add_argument("--official", default=None, help="folder with the official backbone (see the docstring)")
    ap.add_argument("--backend", default="auto", help="vitattn MaSA backend")
    ap.add_argument("--mem-limit-gib", type=float, default=16.0, help="address-space limit of every worker")


def main() -> None:
    cli("bench_detection", run, COLUMNS, __doc__, quick_help="400x672 / 256x432, stage 3 only", options=_options,
        run_kwargs=lambda a: dict(official=os.path.expanduser(a.official) if a.official else None, backend=a.backend,
                                  mem_limit_gib=a.mem_limit_gib))


if __name__ == "__main__":
    main()
