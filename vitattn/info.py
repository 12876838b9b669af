"""``python -m vitattn.info``: versions, and which backends can run here and why not."""

from __future__ import annotations

import importlib
import platform
import sys

import torch

from . import __version__, _triton
from ._dispatch import Dispatcher

# ops whose module defines `dispatcher` (and for MaSA an example call context)
OPS = ("masa", "sinkhorn", "group_attention", "dynamixer")


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception as exc:
        return f"absent ({exc.__class__.__name__})"


def _example_context(device: torch.device) -> dict:
    # a typical RMT-S stage: the can-run checks judge dtype, device and head dims
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return dict(device=device, dtype=dtype, d=32, dv=32, H=14, W=14, B=1, heads=8, decomposed=False)


def report() -> str:
    lines = [
        f"vitattn {__version__}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; CUDA device: "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none") + ")",
        f"triton {_version('triton')}" + ("; TRITON_INTERPRET=1: kernels run on CPU tensors" if _triton.interpreting() else ""),
    ]
    try:
        ext = importlib.import_module("vitattn._extension")
        lines.append("compiled extension vitattn._C: " + ext.status())
    except ModuleNotFoundError:
        lines.append("compiled extension vitattn._C: not part of this build")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for op in OPS:
        try:
            mod = importlib.import_module(f"vitattn.{op}")
        except ModuleNotFoundError:
            continue
        disp = getattr(mod, "dispatcher", None)
        if not isinstance(disp, Dispatcher):
            continue
        lines.append(f"\n{op}: backends in the order 'auto' tries them")
        if op != "masa":
            lines.append("  registered: " + ", ".join(n for n, _ in disp.explain_registered()))
            continue
        for dev in devices:
            ctx = _example_context(dev)
            lines.append(f"  {dev.type} tensors ({str(ctx['dtype']).replace('torch.', '')}):")
            for name, why in disp.explain(ctx):
                lines.append(f"    {name:7s} " + ("can run" if why is None else f"no: {why}"))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
    sys.exit(0)
