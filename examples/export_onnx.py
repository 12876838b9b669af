#!/usr/bin/env python
"""Export a vitattn model to ONNX and check it in onnxruntime.

    python examples/export_onnx.py --model rmt_t                       # rmt_t.onnx, 224x224, batch 1
    python examples/export_onnx.py --model sret_t --batch 2 --dynamic-batch --output sret_t.onnx
    python examples/export_onnx.py --model rmt_t --features-only --img-size 512 640   # detection backbone
    python examples/export_onnx.py --model dynamixer_s --pretrained runs/a/last.pt

Steps: build the model (eval mode), ``torch.onnx.export(model, (x,), dynamo=True)`` -- the
vitattn ops lower themselves to standard ONNX operators while the exporter traces, no extra
arguments needed -- save the .onnx file, run it with onnxruntime on the CPU and compare with
PyTorch on the same input: prints the largest absolute and relative error of every output
and exits with status 1 when one exceeds --tol.

Needs ``pip install onnx onnxscript onnxruntime`` (``pip install vitattn[onnx]``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import vitattn.models as vm


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="rmt_t", choices=vm.list_models())
    ap.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="N",
                    help="input height (and width; one value: square); default 224")
    ap.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    ap.add_argument("--dynamic-batch", action="store_true",
                    help="export the batch dimension as dynamic (use --batch 2 or more: an example batch of 1 "
                         "is specialised by torch.export)")
    ap.add_argument("--features-only", action="store_true", help="export the feature extractor (list of NCHW maps)")
    ap.add_argument("--pretrained", default=None, help="local checkpoint to load (default: random weights)")
    ap.add_argument("--model-kwargs", default="{}", help="JSON object of extra constructor arguments")
    ap.add_argument("--output", default=None, help="where to write the .onnx file (default: <model>.onnx)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for PyTorch and onnxruntime")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest relative error accepted (default 1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def build(args: argparse.Namespace) -> torch.nn.Module:
    kwargs = json.loads(args.model_kwargs)
    if args.features_only:
        kwargs["features_only"] = True
    if args.pretrained:
        kwargs["pretrained"] = args.pretrained
    return vm.create_model(args.model, **kwargs).eval()


def flatten(out):
    return [t for o in out for t in flatten(o)] if isinstance(out, (list, tuple)) else [out]


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort  # imported here so that --help works without it

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    h, w = (args.img_size * 2)[:2]
    model = build(args)
    x = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(args.seed))
    path = args.output or f"{args.model}{'_features' if args.features_only else ''}.onnx"

    # 1. export: the plain call; dynamic_shapes only when a dynamic batch is asked for
    kw = {}
    if args.dynamic_batch:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    t0 = time.perf_counter()
    program = torch.onnx.export(model, (x,), dynamo=True, **kw)
    program.save(path)
    print(f"exported {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) "
          f"to {path} ({os.path.getsize(path) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.0f} s")

    # 2. onnxruntime on the CPU
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inputs = [x]
    if args.dynamic_batch:  # another batch size through the same file
        inputs.append(torch.randn(args.batch + 1, 3, h, w, generator=torch.Generator().manual_seed(args.seed + 1)))

    # 3. the same inputs through PyTorch; report the error of every output
    worst = 0.0
    for inp in inputs:
        got = session.run(None, {session.get_inputs()[0].name: inp.numpy()})
        with torch.no_grad():
            want = [t.numpy() for t in flatten(model(inp))]
        if len(got) != len(want):
            print(f"onnxruntime returned {len(got)} outputs, PyTorch {len(want)}")
            return 1
        for i, (a, b) in enumerate(zip(got, want)):
            abs_err = float(np.abs(a - b).max())
            rel = abs_err / float(np.abs(b).max())
            worst = max(worst, rel)
            print(f"batch {inp.shape[0]} output {i} {tuple(b.shape)}: max abs error {abs_err:.3e}, "
                  f"relative {rel:.3e}")
    ok = worst <= args.tol
    print(f"max relative error {worst:.3e} ({'OK' if ok else 'FAILED'}: tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
