"""The Triton kernels compiled for real GPUs without a GPU (tests/_compile_harness.py).

* Always on (a few minutes on 2 cores): one forward + backward of every op at a model shape,
  in the model's layout, captured from the real launchers and compiled for sm_90a and
  sm_80 with the runtime's own specialisation; no launch-resource overflow, no register
  spills beyond the budget, and each kernel's shared-memory function (what the can-run
  checks use) at least what the compiler allocates.
* Opt-in full matrix (VITATTN_COMPILE_CHECK=1; about an hour on 2 cores): every model
  (forward + backward, op calls recorded from a real fp32 run and replayed in fp16, bf16
  and fp32) and every op at its dispatch limits, for sm_80 and sm_90a.
  VITATTN_COMPILE_MODELS=rmt_t,sret_t,... narrows the models.
* fp32 dot precision: the kernels use "tf32x3" for fp32 inputs; the fp32 tests' own
  assertions hold when every fp32 matrix product of the math is emulated in that mode.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import _compile_harness as H
import vitattn
from vitattn import _env
from _util import TOL, TRITON_DEVICE

FULL = _env.flag("VITATTN_COMPILE_CHECK")
needs_interpreter = pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="captures launches under TRITON_INTERPRET=1")

KERNEL_MODULES = {"masa": "vitattn.kernels.masa", "group_attention": "vitattn.kernels.group_attention",
                  "sinkhorn": "vitattn.kernels.sinkhorn", "dynamixer": "vitattn.kernels.dynamixer",
                  "_common": "vitattn.kernels._common"}


def _r(*shape, dtype, grad=True):
    return torch.randn(*shape).to(dtype).requires_grad_(grad)


# ---------------------------------------------------------------- model-shape calls, model layouts


def rmt_call(dtype, B, heads, H_, W, d, decomposed):
    """MaSA as VisionRetention calls it: (B, H, W, heads, d) projections permuted to (B, heads, H, W, d)."""
    q, k, v = (_r(B, H_, W, heads, d, dtype=dtype) for _ in range(3))
    gamma = torch.linspace(0.7, 0.95, heads, dtype=torch.float32)
    perm = lambda t: t.permute(0, 3, 1, 2, 4)
    return lambda: vitattn.masa(perm(q), perm(k), perm(v), gamma, decomposed=decomposed, scale=1.0, backend="triton")


def sret_call(dtype, B, heads, N, d, groups, permuted):
    """Group attention as SReT's GroupAttention: qkv (B, N, 3, heads, d) permuted and unbound."""
    qkv = _r(B, N, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4)
    perm = torch.randperm(N) if permuted else None
    return lambda: vitattn.group_attention(qkv[0], qkv[1], qkv[2], groups, perm=perm, backend="triton")


def setformer_call(dtype, B, heads, side, d, ref_side):
    """ot_attention as SeTAttention: (B, H, W, heads*d) features split into heads (views)."""
    n, m = side * side, ref_side * ref_side
    f = _r(B, side, side, heads * d, dtype=dtype).view(B, n, heads, d).transpose(1, 2)
    v = _r(B, side, side, heads * d, dtype=dtype).view(B, n, heads, d).transpose(1, 2)
    ref = _r(heads, m, d, dtype=dtype)
    filt = vitattn.gaussian_filter_2d(side, side, m, sigma=0.1)
    return lambda: vitattn.ot_attention(f, ref, v, eps=0.1, iters=5, pos_filter=filt, backend="triton")


def dynamixer_call(dtype, B, side, C, S, d):
    """DynaMixer along H of a (B, H, W, C) grid: x.transpose(1, 2), a view."""
    L = side
    x = _r(B, side, side, C, dtype=dtype)
    wc, bc = _r(S * d, C, dtype=dtype), _r(S * d, dtype=dtype)
    wg, bg = _r(L * L, L * d, dtype=dtype), _r(L * L, dtype=dtype)
    return lambda: vitattn.dynamixer(x.transpose(1, 2), wc, bc, wg, bg, S, backend="triton")


# one forward + backward per op family at a model shape (RMT-T stages 1 and 3, SReT-T stage 1,
# SeTformer-mini stage 2, DynaMixer-S stage 1); fp32 (tf32x3 backward), bf16, fp16 (DynaMixer's
# kernels refuse fp32 on a GPU: their backward spills registers)
ALWAYS = [
    ("rmt_t stage1 decomposed fp32", lambda: rmt_call(torch.float32, 1, 4, 56, 56, 16, True)),
    ("rmt_t stage3 whole bf16", lambda: rmt_call(torch.bfloat16, 1, 8, 14, 14, 32, False)),
    ("sret_t stage1 permuted fp16", lambda: sret_call(torch.float16, 1, 2, 784, 32, 2, True)),
    ("setformer_mini stage2 bf16", lambda: setformer_call(torch.bfloat16, 1, 4, 28, 32, 8)),
    ("dynamixer_s stage1 bf16", lambda: dynamixer_call(torch.bfloat16, 1, 32, 192, 8, 2)),
]


def capture_cases(cases):
    calls = []
    for label, make in cases:
        fn = make()
        with H.capture() as rec:
            H.call_case(rec, label, fn)
        calls += rec.calls
    return calls


def _dtype_of(result) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[result["dtype"]]


def smem_bound_failures(results):
    """Results whose kernel module's smem_bytes is below what the compiler allocated."""
    bad = []
    for r in results:
        if "error" in r:
            continue
        mod = importlib.import_module(r["module"])
        need = mod.smem_bytes(r["kernel"], r["meta"], r["opts"], _dtype_of(r), r["arch"])
        if need < r["shared"]:
            bad.append(f"{r['kernel']} sm_{r['arch']} {r['meta']}: smem_bytes says {need}, compiled {r['shared']}")
    return bad


@needs_interpreter
def test_model_shapes_compile_for_sm80_sm90a_without_spills():
    calls = capture_cases(ALWAYS)
    kernels = {c["kernel"] for c in calls}
    # every kernel family is there: forward, backward and the partial-sum reduction
    assert {"_masa_fwd_kernel", "_masa_bwd_dq_kernel", "_masa_bwd_dkdv_kernel", "_fwd_sweep_kernel",
            "_bwd_sweep_kernel", "_bwd_rows_kernel", "_dw_kernel", "_sum_partials_kernel"} <= kernels, kernels
    results = H.run_compile(calls, archs=(90, 80), jobs=2)
    assert not H.violations(results), "\n".join(H.violations(results)) + "\n" + H.table(results)
    assert not smem_bound_failures(results), smem_bound_failures(results)


# ---------------------------------------------------------------- opt-in full matrix


H100, A100 = 232448, 166912  # shared_memory_per_block_optin, bytes


def _kern(name):
    return importlib.import_module(KERNEL_MODULES[name])


def limit_cases(dtype):
    """Every op at the largest shapes its Triton can-run check admits on H100 (candidates that
    the kernels' can_run refuses there are left out), in plain layouts."""
    masa_k, group_k, sk_k, dyn_k = _kern("masa"), _kern("group_attention"), _kern("sinkhorn"), _kern("dynamixer")
    cases = []
    for d in (64, 128, 256):
        if masa_k.can_run([196, 14], d, d, dtype, H100) is not None:
            continue
        q, k, v = (_r(1, 2, 14, 14, d, dtype=dtype) for _ in range(3))
        for dec in (False, True):
            cases.append((f"limit masa d={d} dec={dec}",
                          lambda q=q, k=k, v=v, dec=dec: (lambda: vitattn.masa(q, k, v, 0.9, decomposed=dec,
                                                                               backend="triton"))))
    for d, n in ((64, 49), (128, 98), (256, 16), (256, 200)):
        if group_k.can_run(n, d, d, dtype, H100) is not None:
            continue
        qkv = [_r(1, 2, 2 * n, d, dtype=dtype) for _ in range(3)]
        cases.append((f"limit group d={d} n={n}",
                      lambda qkv=qkv: (lambda: vitattn.group_attention(*qkv, 2, backend="triton"))))
    for m, d in ((256, 16), (128, 64), (128, 32), (64, 64), (64, 128), (32, 128), (16, 256)):
        if sk_k.can_run(300, m, d, d, dtype, True, H100) is not None:
            continue
        x, ref, v = _r(2, 2, 300, d, dtype=dtype), _r(2, m, d, dtype=dtype), _r(2, 2, 300, d, dtype=dtype)
        for fn in (vitattn.ot_aggregate, vitattn.ot_attention):
            cases.append((f"limit {fn.__name__} m={m} d={d}",
                          lambda x=x, ref=ref, v=v, fn=fn: (lambda: fn(x, ref, v, iters=3, backend="triton"))))
    S = _r(4, 300, 256, dtype=dtype)
    cases.append(("limit sinkhorn m=256", lambda: (lambda: vitattn.sinkhorn(S, iters=3, backend="triton"))))
    for L, CS, d in ((64, 128, 8), (32, 128, 16), (64, 32, 8), (32, 64, 8), (16, 32, 8)):
        if dyn_k.can_run(L, CS, L * d, dtype, H100) is not None:
            continue
        S_ = 2
        x = _r(1, 2, L, CS * S_, dtype=dtype)
        w = (_r(S_ * d, CS * S_, dtype=dtype), _r(S_ * d, dtype=dtype), _r(L * L, L * d, dtype=dtype),
             _r(L * L, dtype=dtype))
        cases.append((f"limit dynamixer L={L} C/S={CS} L*d={L * d}",
                      lambda x=x, w=w, S_=S_: (lambda: vitattn.dynamixer(x, *w, S_, backend="triton"))))
    return [(f"{label} {str(dtype)[6:]}", make) for label, make in cases]


MODELS = ("rmt_t", "rmt_s", "rmt_b", "rmt_l", "sret_t", "sret_s", "sret_lt", "dynamixer_s", "dynamixer_m",
          "dynamixer_l", "setformer_mini", "setformer_tiny", "setformer_small", "setformer_base")


@needs_interpreter
@pytest.mark.skipif(not FULL, reason="opt-in (VITATTN_COMPILE_CHECK=1): compiles every model and limit "
                                     "shape for sm_80 and sm_90a, about an hour on 2 cores")
def test_full_matrix_models_and_limits_compile_without_spills():
    models = [m for m in (_env.text("VITATTN_COMPILE_MODELS") or ",".join(MODELS)).split(",") if m]
    calls = []
    with H.capture():
        with H.record_ops() as ops:
            for name in models:
                H.model_case(ops, name)
    for dtype in ("fp32", "fp16", "bf16"):
        with H.capture() as rec:
            H.replay_ops(ops.calls, dtype, rec)
        calls += rec.calls
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        calls += capture_cases(limit_cases(dtype))
    results = H.run_compile(calls, archs=(90, 80), jobs=max(1, min(4, os.cpu_count() or 1)), timeout=6 * 3600)
    report = _env.text("VITATTN_COMPILE_REPORT")
    if report:
        with open(report, "w") as f:
            f.write(H.table(results) + "\n")
    assert not H.violations(results), "\n".join(H.violations(results))
    assert not smem_bound_failures(results), smem_bound_failures(results)


# ---------------------------------------------------------------- fp32 dot precision (tf32x3)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 mantissa bits), to nearest with ties away from zero (cvt.rna.tf32.f32)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def _mm3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as Triton's "tf32x3" computes it: three TF32 products (big*small, small*big, big*big),
    each exact, accumulated in fp32; the small*small term is dropped."""
    ab, bb = _tf32(a), _tf32(b)
    as_, bs = _tf32(a - ab), _tf32(b - bb)
    hi = torch.float64  # the products are exact in fp64; the sum is rounded to fp32 as the MMA does
    return ((as_.to(hi) @ bb.to(hi)) + (ab.to(hi) @ bs.to(hi)) + (ab.to(hi) @ bb.to(hi))).to(torch.float32)


class TF32x3(TorchDispatchMode):
    """Every fp32 matrix product (aten mm / bmm / addmm / baddbmm, their out= and in-place forms)
    inside the block computed as tf32x3 (counted in .calls)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name not in _PRODUCTS or not tensors or any(t.dtype != torch.float32 for t in tensors):
            return func(*args, **kwargs)
        self.calls += 1
        out = kwargs.pop("out", None)
        if name in ("mm", "bmm"):
            res = _mm3(args[0], args[1])
            base = None
        else:  # addmm / baddbmm (self, a, b, beta=1, alpha=1)
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            res = _mm3(args[1], args[2]) * alpha
            base = args[0]
            if beta != 0:
                res = res + beta * base
        if name.endswith("_"):  # in place on self
            return args[0].copy_(res)
        if out is not None:
            return out.copy_(res)
        return res


_PRODUCTS = ("mm", "bmm", "addmm", "baddbmm", "addmm_", "baddbmm_")


def test_tf32x3_emulation_is_faithful():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 96, generator=g), torch.randn(96, 48, generator=g)
    exact = a.double() @ b.double()
    err3 = (_mm3(a, b).double() - exact).abs().max() / exact.abs().max()
    err1 = (_tf32(a).double() @ _tf32(b).double() - exact).abs().max() / exact.abs().max()
    assert 1e-9 < err3 < 2e-6 and err1 > 1e-4  # three TF32 passes recover about fp32 accuracy, one does not


@contextlib.contextmanager
def _emulated():
    mode = TF32x3()
    with mode:
        yield mode
    assert mode.calls > 0, "no fp32 matrix product was emulated: the check would prove nothing"


def _impl(op):
    return importlib.import_module(f"vitattn.ops.{op}.backends").dispatcher.impl("torch")


def test_fp32_tests_pass_with_tf32x3_products():
    """The fp32 assertions of the op tests, on inputs like theirs, hold with tf32x3 products: the
    "torch" backends' math run with every fp32 matrix product emulated, large logits
    (|q|, |k| ~ 30) included."""
    from vitattn import reference

    def close(got, want, tol, what):
        torch.testing.assert_close(got.double(), want.double(), atol=tol[0], rtol=tol[1], msg=lambda m: f"{what}: {m}")

    g = torch.Generator().manual_seed(0)
    masa = _impl("masa")
    for mag, (H_, W, d, dv) in ((1.0, (5, 9, 24, 20)), (30 ** 0.5 * 5.5, (6, 7, 24, 16)), (1.0, (6, 5, 16, 16))):
        q, k, v = ((torch.randn(1, 2, H_, W, n, generator=g, dtype=torch.float64) * (mag if i < 2 else 1))
                   for i, n in enumerate((d, d, dv)))
        gamma = torch.tensor([1e-4, 1e-6] if mag > 1 else [0.8, 0.6], dtype=torch.float64)
        scale = d ** -0.5
        for dec in (False, True):
            qf, kf, vf = (t.float() for t in (q, k, v))
            dout = torch.randn(1, 2, H_, W, dv, generator=g)
            with _emulated():
                lg = gamma.float().log()
                out, v_mid, lse_w, lse_h = masa.fwd(qf, kf, vf, lg, scale, dec)
                grads = masa.bwd(dout, qf, kf, vf, lg, out, v_mid, lse_w, lse_h, scale, dec)[:3]
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (qf, kf, vf))
            want = reference.masa(q64, k64, v64, gamma, decomposed=dec, scale=scale)
            close(out, want, TOL[torch.float32], f"masa out mag={mag} dec={dec}")
            if mag == 1.0:
                wgrads = torch.autograd.grad(want, (q64, k64, v64), dout.double())
                for name, a, b in zip("qkv", grads, wgrads):
                    close(a, b, (1e-3, 1e-3), f"masa d{name} dec={dec}")
    # group attention and OT, at their test files' fp32 tolerances
    x = torch.randn(2, 2, 24, 16, generator=g)
    qf, kf, vf = (x + 0.1 * torch.randn(x.shape, generator=g) for _ in range(3))
    with _emulated():
        got, _ = _impl("group_attention").fwd(qf, kf, vf, None, 3, 16 ** -0.5)
    close(got, reference.group_attention(qf.double(), kf.double(), vf.double(), 3), (5e-4, 5e-4), "group attention")
    xs, ref = torch.randn(2, 2, 33, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    with _emulated():
        got = _impl("sinkhorn").ot_fwd(xs, ref, xs, None, 0.3, 4, True)[0]
    want = reference.ot_attention(xs.double(), ref.double(), eps=0.3, iters=4)
    close(got, want, (3e-5 * float(want.abs().max()), 3e-4), "ot_attention")


# ---------------------------------------------------------------- dispatch limits from resources


@pytest.mark.parametrize("smem", [H100, A100], ids=["H100", "A100"])
def test_dispatch_refuses_what_a_gpu_cannot_launch_and_keeps_the_model_shapes(monkeypatch, smem):
    """The Triton can-run checks as "auto" sees them on a CUDA device whose blocks may use smem
    bytes of shared memory (the GPU's property replaced; no GPU needed): the shapes the first
    offline compile showed overflowing (DynaMixer at its old limits) are refused with the
    reason, the models' shapes are accepted."""
    from vitattn.ops.dynamixer import backends as dyn_b
    from vitattn.ops.group_attention import backends as ga_b
    from vitattn.ops.masa import backends as masa_b
    from vitattn.ops.sinkhorn import backends as sk_b

    monkeypatch.setattr(_kern("_common"), "smem_limit", lambda device: smem)
    cuda = torch.device("cuda")

    def dyn(L, CS, d, dtype):
        return dyn_b._triton_limits(dict(device=cuda, dtype=dtype, L=L, C=CS * 8, S=8, d=d), True)

    # the old limits (L 64, C/S 128, L*d 512): fp16/bf16 accepted only where every kernel's shared
    # memory fits; fp32 refused on a GPU (its backward spills registers at any block size)
    dk = _kern("dynamixer")
    for L, CS in ((64, 128), (32, 128), (64, 64), (64, 32), (32, 32)):
        for dtype in (torch.float16, torch.bfloat16):
            why = dyn(L, CS, 512 // L, dtype)
            need = max(dk.smem_bytes(n, m, o, dtype) for n, (m, o) in dk.launch_configs(L, CS, 512, dtype).items())
            if why is None:
                assert need <= smem, (L, CS, dtype, need)
            else:
                assert "shared memory" in why or "spill" in why, why
        assert "spill" in dyn(L, CS, 512 // L, torch.float32)
    for L, CS, d in ((32, 24, 2), (16, 24, 2), (32, 32, 8), (16, 32, 8)):  # DynaMixer-S/M/L
        for dtype in (torch.float16, torch.bfloat16):
            assert dyn(L, CS, d, dtype) is None, (L, CS, d, dtype)
        assert "float32" in dyn(L, CS, d, torch.float32)

    def masa(H, W, d, decomposed, dtype):
        return masa_b._triton_resources(dict(device=cuda, dtype=dtype, d=d, dv=d, H=H, W=W,
                                             decomposed=decomposed), True)

    for H, W, d, dec in ((56, 56, 16, True), (28, 28, 32, True), (14, 14, 32, False), (7, 7, 32, False),
                         (25, 42, 32, False), (14, 14, 64, False)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert masa(H, W, d, dec, dtype) is None, (H, W, d, dtype)
    assert "spill" in masa(14, 14, 256, False, torch.float32)

    for n, d in ((49, 64), (196, 64), (49, 32)):  # SReT-T/S groups
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert ga_b._triton_resources(dict(device=cuda, dtype=dtype, group_size=n, d=d, dv=d), True) is None
    assert "spill" in ga_b._triton_resources(dict(device=cuda, dtype=torch.float32, group_size=49, d=256, dv=256),
                                             True)

    for n, m in ((3136, 64), (784, 64), (196, 49), (49, 16)):  # SeTformer stages, head dim 32
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ctx = dict(device=cuda, dtype=dtype, kind="ot_attention", n=n, m=m, d=32, dv=32)
            assert sk_b._triton_limits(ctx, True) is None, (n, m, dtype)
    big = dict(device=cuda, dtype=torch.float32, kind="ot_attention", n=3136, m=256, d=256, dv=256)
    assert sk_b._triton_limits(big, True) is not None
