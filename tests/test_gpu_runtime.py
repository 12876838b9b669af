"""GPU-only runtime behaviour (skipped without CUDA): no host synchronisation in any op's
forward or backward, and an RMT block's forward + backward captured in a CUDA graph.

* Every op is called on CUDA tensors, with its default settings, once to warm up (kernel
  compilation, per-tensor caches), then again forward and backward under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call
  (``.item()``, ``bool(t)``, device-to-host copies, ...). Every backend that can run the call
  is tested, "auto" included.
* An RMT block (decomposed and whole-grid retention) is warmed up on a side stream, its
  forward, loss and backward are captured in one CUDA graph, and replays on new inputs
  must give the eager values and gradients of the same block.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import vitattn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
BACKENDS = ("auto", "triton", "cuda", "torch")


@contextlib.contextmanager
def sync_errors():
    """Raise on any synchronising CUDA call inside the block."""
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def _rand(*shape, dtype=torch.float32, scale=1.0, grad=True):
    t = (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def _calls(dtype):
    """(name, function of backend returning the op's output, differentiable inputs)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    B, heads, H, W, d = 2, 2, 6, 7, 16
    q, k, v = (_rand(B, heads, H, W, d, dtype=dtype) for _ in range(3))
    gamma = (0.6 + 0.3 * torch.rand(heads, generator=g)).to(DEV).requires_grad_()
    N, G = 48, 4
    gq, gk, gv = (_rand(B, heads, N, d, dtype=dtype) for _ in range(3))
    perm = torch.randperm(N, generator=g).to(DEV)
    S = _rand(2, 3, 40, 12, dtype=dtype, scale=2.0)
    a = (torch.rand(40, generator=g) + 0.5).to(DEV).requires_grad_()
    b = (torch.rand(3, 12, generator=g) + 0.5).to(DEV).requires_grad_()
    x, xv = _rand(B, heads, 50, 16, dtype=dtype), _rand(B, heads, 50, 16, dtype=dtype)
    ref = _rand(heads, 9, 16, dtype=dtype)
    filt = vitattn.gaussian_filter_2d(5, 10, 9, device=DEV, dtype=torch.float32)
    L, C, Sg, dd = 8, 12, 2, 3
    dx = _rand(3, 5, L, C, dtype=dtype)
    wc, bc = _rand(Sg * dd, C, dtype=dtype, scale=0.3), _rand(Sg * dd, dtype=dtype)
    wg, bgg = _rand(L * L, L * dd, dtype=dtype, scale=0.3), _rand(L * L, dtype=dtype)
    return [
        ("masa", lambda bk: vitattn.masa(q, k, v, gamma, backend=bk), (q, k, v, gamma)),
        ("masa decomposed", lambda bk: vitattn.masa(q, k, v, gamma, decomposed=True, backend=bk), (q, k, v, gamma)),
        ("masa float gamma", lambda bk: vitattn.masa(q, k, v, 0.9, decomposed=True, backend=bk), (q, k, v)),
        ("group_attention", lambda bk: vitattn.group_attention(gq, gk, gv, G, perm=perm, backend=bk), (gq, gk, gv)),
        ("sinkhorn", lambda bk: vitattn.sinkhorn(S, a=a, b=b, iters=4, backend=bk), (S, a, b)),
        ("ot_aggregate", lambda bk: vitattn.ot_aggregate(x, ref, xv, pos_filter=filt, iters=3, backend=bk), (x, ref, xv)),
        ("ot_attention", lambda bk: vitattn.ot_attention(x, ref, xv, iters=3, backend=bk), (x, ref, xv)),
        ("dynamixer", lambda bk: vitattn.dynamixer(dx, wc, bc, wg, bgg, Sg, backend=bk), (dx, wc, bc, wg, bgg)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_in_forward_or_backward(backend, dtype):
    ran = []
    for name, fn, inputs in _calls(dtype):
        try:
            out = fn(backend)  # warm-up: compiles kernels, fills per-tensor caches
        except vitattn.BackendUnavailableError:
            continue
        except ValueError as exc:  # an op that does not know this backend at all
            if "unknown backend" in str(exc):
                continue
            raise
        grad = torch.randn_like(out)
        torch.autograd.grad(out, inputs, grad)
        with sync_errors():
            out = fn(backend)
            grads = torch.autograd.grad(out, inputs, grad)
        torch.cuda.synchronize()
        assert all(torch.isfinite(g).all() for g in grads), name
        ran.append(name)
    if not ran:
        pytest.skip(f"backend {backend!r} runs none of the ops here")


# ---------------------------------------------------------------- CUDA graph of an RMT block


def _rmt_block(decomposed: bool, backend: str):
    from vitattn.models.rmt import RetBlock, RetNetRelPos2d

    torch.manual_seed(1)
    embed, heads = 64, 4
    blk = RetBlock("chunk" if decomposed else "whole", embed, heads, 3 * embed, attn_backend=backend).to(DEV)
    relpos = RetNetRelPos2d(embed, heads, 2, 4).to(DEV)
    return blk, relpos


@pytest.mark.parametrize("decomposed", [True, False])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_rmt_block_forward_backward_in_a_cuda_graph(decomposed, backend):
    blk, relpos = _rmt_block(decomposed, backend)
    B, H, W = 2, 14, 14
    params = [p for p in blk.parameters()]
    static_x = torch.randn(B, H, W, 64, device=DEV, requires_grad=True)

    def step():
        rel = relpos(H, W)
        out = blk(static_x, rel)
        loss = out.square().mean()
        loss.backward()
        return out, loss

    # warm up on a side stream (compilation, caches, autograd's first-use allocations)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            blk.zero_grad(set_to_none=True)
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)

    blk.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_loss = step()

    for seed in (2, 3):
        new_x = torch.randn(B, H, W, 64, device=DEV, generator=torch.Generator(DEV).manual_seed(seed))
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        # eager reference on the same block and input
        x = new_x.clone().requires_grad_()
        out = blk(x, relpos(H, W))
        loss = out.square().mean()
        want = torch.autograd.grad(loss, [x] + params)
        torch.testing.assert_close(static_out, out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(static_loss, loss, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(static_x.grad, want[0], atol=1e-5, rtol=1e-4)
        for p, w in zip(params, want[1:]):
            torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-4)
