"""``python -m vitattn.info``: versions, the environment variables, and which backends of
every op can run on this machine (for a typical model-shaped call) and why not."""

from __future__ import annotations

import importlib
import platform
import sys

import torch

from . import __version__, _env, _extension, _triton


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception as exc:
        return f"absent ({exc.__class__.__name__})"


def _example_calls(device: torch.device):
    """One typical call per op (RMT-S stage 3, SReT-T, SeTformer stage 2, DynaMixer-S) in the
    dtype a model would use on that device."""
    import vitattn

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = lambda *s: torch.empty(*s, device=device, dtype=dt)
    return {
        "masa": ((t(1, 8, 14, 14, 32),) * 3 + (0.9,), {}),
        "sinkhorn": ((t(1, 8, 196, 64),), {}),
        "ot_aggregate": ((t(1, 4, 784, 32), t(4, 64, 32)), {}),
        "ot_attention": ((t(1, 4, 784, 32), t(4, 64, 32)), {}),
        "group_attention": ((t(1, 4, 196, 32),) * 3 + (4,), {}),
        "dynamixer": ((t(1, 28, 28, 8 * 24), t(8 * 2, 8 * 24), None, t(28 * 28, 28 * 2), None, 8), {}),
    }, vitattn


def report() -> str:
    lines = [
        f"vitattn {__version__}",
        f"python {platform.python_version()} on {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; CUDA device: "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none") + ")",
        f"triton {_version('triton')}"
        + ("; TRITON_INTERPRET=1: kernels run on CPU tensors" if _triton.interpreting() else ""),
        "compiled extension vitattn._C: " + _extension.status(),
        "",
        "environment variables (vitattn/_env.py):",
    ]
    import os

    for name, (default, meaning) in _env.VARIABLES.items():
        val = os.environ.get(name)
        shown = f"{val!r}" if val is not None else f"unset (default {default!r})"
        lines.append(f"  {name:24s} {shown:28s} {meaning}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        calls, vitattn = _example_calls(dev)
        for op, (args, kwargs) in calls.items():
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            lines.append("")
            lines.append(f"[{dev.type}, {str(args[0].dtype).replace('torch.', '')}, {shapes}]")
            try:
                lines.append(str(vitattn.explain(op, *args, **kwargs)))
            except Exception as exc:  # report, never crash the report
                lines.append(f"{op}: explain failed: {exc.__class__.__name__}: {exc}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
    sys.exit(0)
