"""SeTformer (our reconstruction): sizes, the SeT layer against a dense formula, every backend
against the reference op, autograd, checkpoints, determinism, layouts, compile, bad input."""

import importlib
import math

import pytest
import torch

import vitattn.models._common as common
import vitattn.models.setformer as st

from _models_util import (DEV, assert_every_param_has_finite_nonzero_grad, bf16_autocast_error,
                          check_channels_last_and_strided_inputs, check_checkpointing_same_grads,
                          check_convolutions_get_channels_last_inputs,
                          check_compiled_block, check_drop_path_in_training_only,
                          check_eval_determinism_and_batch_independence, check_export, check_strict_round_trip,
                          images, one_thread, randomize_batchnorm)  # noqa: F401 (one_thread: autouse fixture)

# modules by import path: the packages bind the names sinkhorn/ot_attention to the functions
_SK = importlib.import_module("vitattn.ops.sinkhorn.op")
ref_sinkhorn = importlib.import_module("vitattn.ops.sinkhorn.reference")


def _runnable(name):
    ctx = dict(device=torch.device(DEV), dtype=torch.float64, n=16, m=4, d=8, dv=8)
    return _SK.dispatcher.reason(name, ctx, auto=False) is None


# every Sinkhorn backend that can run fp64 here by name
BACKENDS = [b for b in ("torch", "triton") if _runnable(b)]
SLOW_TRITON = DEV == "cpu"  # the Triton interpreter: smallest shapes only

# our chosen sizes (asserted so that a change is deliberate); Mini matches the paper's ~16M
COUNTS = {"setformer_mini": 15_961_384, "setformer_tiny": 28_168_840, "setformer_small": 51_144_184,
          "setformer_base": 90_304_168}


def tiny_cfg():
    return dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 4], ref_sides=[3, 2, 2, 1],
                mlp_ratio=2.0, num_classes=7, drop_path_rate=0.0, layer_scale=0.5)


def tiny(**kw):
    return st.SeTformer(**{**tiny_cfg(), **kw})


def randomize(model, seed=0):
    """Non-trivial BatchNorm statistics and biases, so eval-mode checks see every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            randomize_batchnorm(m, g)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
    return model


# ---------------------------------------------------------------- sizes and layout


@pytest.mark.parametrize("name", list(COUNTS))
def test_param_counts(name):
    with torch.device("meta"):  # layout only (the L2-normalised form; the Nystrom default: test_models_setformer_nystrom)
        model = getattr(st, name)(embedding="normalized")
    n = sum(p.numel() for p in model.parameters())
    assert n == COUNTS[name]
    if name == "setformer_mini":
        assert abs(n - 16e6) / 16e6 < 0.02  # the paper's ~16M
    # four stages, every stage ends but the last with a stride-2 conv downsampling
    assert len(model.stages) == 4
    assert [s.downsample is None for s in model.stages] == [False, False, False, True]
    assert model.patch_embed.proj[0].stride == (2, 2) and model.patch_embed.proj[3].stride == (2, 2)
    for s in model.stages[:3]:
        assert s.downsample.reduction.kernel_size == (3, 3) and s.downsample.reduction.stride == (2, 2)


def test_state_dict_names():
    model = tiny()
    keys = list(model.state_dict())
    assert "stages.0.blocks.0.attn.ref" in keys
    assert model.state_dict()["stages.0.blocks.0.attn.ref"].shape == (2, 9, 8)  # (heads, s*s, head dim)
    assert {"patch_embed.proj.0.weight", "stages.0.downsample.reduction.weight", "norm.weight",
            "head.weight", "stages.3.blocks.0.gamma2"} <= set(keys)


# ---------------------------------------------------------------- the SeT layer vs a dense formula


def gaussian_filter(H, W, s, tau):
    """Written out: exp(-((r/H - p/s)/tau)^2) * exp(-((c/W - q/s)/tau)^2), coordinates from 1."""
    filt = torch.empty(H * W, s * s, dtype=torch.float64)
    for r in range(H):
        for c in range(W):
            for p in range(s):
                for q in range(s):
                    dr = (r + 1) / H - (p + 1) / s
                    dc = (c + 1) / W - (q + 1) / s
                    filt[r * W + c, p * s + q] = math.exp(-((dr / tau) ** 2)) * math.exp(-((dc / tau) ** 2))
    return filt


def dense_set_layer(layer, x):
    """The SeT layer with every matrix materialised: unit-norm features and references, filtered
    scores, log-domain Sinkhorn (row mass m/n, column mass 1), filtered plan, (n/m) T T^T v."""
    B, H, W, C = x.shape
    h, d, m, n = layer.num_heads, layer.head_dim, layer.num_refs, H * W
    f = layer.feat(x).reshape(B, n, h, d).transpose(1, 2)
    f = f / f.norm(dim=-1, keepdim=True)
    y = layer.ref / layer.ref.norm(dim=-1, keepdim=True)
    v = layer.v(x).reshape(B, n, h, d).transpose(1, 2)
    S = torch.einsum("bhnd,hmd->bhnm", f, y)
    filt = gaussian_filter(H, W, layer.ref_side, layer.tau).to(x.device) if layer.tau is not None else None
    if filt is not None:
        S = S * filt
    K = S / layer.eps
    la, lb = math.log(m / n), 0.0
    g = torch.zeros(B, h, 1, m, dtype=x.dtype, device=x.device)
    for _ in range(layer.iters):
        fpot = la - torch.logsumexp(K + g, dim=-1, keepdim=True)
        g = lb - torch.logsumexp(K + fpot, dim=-2, keepdim=True)
    T = torch.exp(K + fpot + g)
    if filt is not None:
        T = T * filt
    out = (n / m) * T @ (T.transpose(-1, -2) @ v)
    return layer.proj(out.transpose(1, 2).reshape(B, H, W, C))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.3, None])
def test_set_layer_matches_dense_formula(backend, tau):
    torch.manual_seed(1)
    small = backend == "triton" and SLOW_TRITON
    dim, heads, H, W, B = (16, 2, 3, 5, 1) if small else (24, 3, 5, 7, 2)  # odd grids
    layer = st.SeTAttention(dim, heads, ref_side=3, eps=0.2, iters=4, tau=tau, attn_backend=backend,
                            embedding="normalized")
    layer = randomize(layer).to(DEV, torch.float64)
    # a non-contiguous input (strided channels)
    x = torch.randn(B, H, W, 2 * dim, dtype=torch.float64, device=DEV)[..., ::2].requires_grad_(True)
    out = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    want = dense_set_layer(layer, xr)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-9)
    dout = torch.randn_like(out)
    params = list(layer.parameters())
    grads = torch.autograd.grad(out, [x] + params, dout)
    grads_ref = torch.autograd.grad(want, [xr] + params, dout)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, gr in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-9, rtol=1e-8, msg=lambda m: f"grad {name}: {m}")


def test_set_layer_gradcheck():
    torch.manual_seed(2)
    layer = st.SeTAttention(8, 2, ref_side=2, eps=0.3, iters=3, tau=0.4, attn_backend="torch",
                            embedding="normalized").double()
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


def test_set_layer_fp32_close_to_fp64():
    torch.manual_seed(3)
    layer = st.SeTAttention(32, 2, ref_side=3, attn_backend="torch", embedding="normalized")
    x = torch.randn(2, 6, 9, 32)
    out = layer(x)
    want = dense_set_layer(layer.double(), x.double())
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-4)


# ---------------------------------------------------------------- whole model


def _reference_ot_attention(x, ref, v=None, *, eps, iters, pos_filter, backend):
    return ref_sinkhorn.ot_attention(x, ref, v, eps=eps, iters=iters, pos_filter=pos_filter)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_backend_matches_reference(backend, monkeypatch):
    torch.manual_seed(4)
    small = backend == "triton" and SLOW_TRITON
    model = randomize(tiny(attn_backend=backend, depths=[1, 1, 1, 1] if small else [1, 1, 2, 1]))
    model = model.to(DEV, torch.float64).eval()
    x = images(1, 32, 48, torch.float64) if small else images(2, 48, 80, torch.float64)  # non-square
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    monkeypatch.setattr(st, "ot_attention", _reference_ot_attention)
    want = model(x)
    grads_ref = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-9)
    for (name, _), g, gr in zip(model.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-9, rtol=1e-8, msg=lambda m: f"grad {name}: {m}")


def test_mini_forward_backward():
    torch.manual_seed(5)
    model = st.setformer_mini(attn_backend="torch", num_classes=100).to(DEV).train()
    x = images(2, 64, 64)  # 16x16 tokens in stage 1; 224 is too slow for the shared CPU
    out = model(x)
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    assert_every_param_has_finite_nonzero_grad(model)


def test_eval_determinism_and_batch_independence():
    torch.manual_seed(6)
    model = randomize(tiny()).to(DEV).eval()
    check_eval_determinism_and_batch_independence(model, images(3, 32, 64))


def test_drop_path_active_in_training_only():
    torch.manual_seed(7)
    model = tiny(drop_path_rate=0.5).to(DEV)
    check_drop_path_in_training_only(model, images(4, 32, 32))


def test_channels_last_and_strided_inputs():
    torch.manual_seed(8)
    check_channels_last_and_strided_inputs(randomize(tiny()).to(DEV).eval())


def test_convolutions_get_channels_last_inputs():
    # the stem's two convolutions and the downsampling between stages
    torch.manual_seed(8)
    check_convolutions_get_channels_last_inputs(randomize(tiny()).to(DEV).eval(), images(2, 32, 64))


def test_autocast_bf16_cpu():
    torch.manual_seed(9)
    model = randomize(tiny(attn_backend="torch")).eval()
    err = bf16_autocast_error(model, images(2, 32, 64).cpu())
    assert err < 5e-2, err  # bf16 has 8 mantissa bits; a wiring error gives O(1)


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(10)
    model = tiny().to(DEV).double()
    check_checkpointing_same_grads(model, images(1, 32, 64, torch.float64), model.stages)


def test_positional_filter_matters():
    """tau changes the output (the filter is wired in) and tau=None removes it."""
    torch.manual_seed(11)
    layer = st.SeTAttention(16, 2, ref_side=2, tau=0.2, attn_backend="torch").double()
    x = torch.randn(1, 4, 6, 16, dtype=torch.float64)
    a = layer(x)
    layer.tau = 0.5
    b = layer(x)
    layer.tau = None
    c = layer(x)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


# ---------------------------------------------------------------- checkpoints


def test_strict_load_of_saved_state_dict(tmp_path):
    torch.manual_seed(12)
    src = randomize(st.setformer_mini(num_classes=10)).eval()
    sd = src.state_dict()
    torch.save({"model": sd}, tmp_path / "mini.pth")
    torch.manual_seed(13)
    check_strict_round_trip(src, lambda: st.setformer_mini(num_classes=10, pretrained=str(tmp_path / "mini.pth")),
                            images(1, 32, 32).cpu())
    bad = dict(sd)
    bad.pop("stages.0.blocks.0.attn.ref")
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="attn.ref"):
        common.load_pretrained(st.setformer_mini(num_classes=10), tmp_path / "missing.pth")


# ---------------------------------------------------------------- torch.compile / export


def test_block_under_torch_compile():
    torch.manual_seed(14)
    blk = st.SeTBlock(32, 2, 3, 2.0, layer_scale=0.5, attn_backend="torch").to(DEV)
    x = torch.randn(2, 6, 10, 32, device=DEV, requires_grad=True)
    check_compiled_block(blk, x)


def test_whole_model_export():
    torch.manual_seed(15)
    model = tiny(attn_backend="torch").eval()
    x = images(1, 32, 64).cpu()
    check_export(model, x)


# ---------------------------------------------------------------- bad input


def test_bad_arguments():
    with pytest.raises(ValueError, match="attn_backend"):
        st.setformer_mini(attn_backend="cuda")  # MaSA's compiled backends are not Sinkhorn backends
    with pytest.raises(TypeError, match="attn_backend"):
        st.SeTAttention(16, 2, attn_backend=1)
    with pytest.raises(ValueError, match="pretrained"):
        st.setformer_mini(pretrained=True)
    with pytest.raises(ValueError, match="path"):
        st.setformer_tiny(pretrained="/nonexistent/setformer.pth")
    with pytest.raises(ValueError, match="num_heads"):
        st.SeTAttention(18, 4)
    with pytest.raises(ValueError, match="eps"):
        st.SeTAttention(16, 2, eps=0.0)
    with pytest.raises(TypeError, match="iters"):
        st.SeTAttention(16, 2, iters=2.5)
    with pytest.raises(ValueError, match="tau"):
        st.SeTAttention(16, 2, tau=-1.0)
    with pytest.raises(ValueError, match="ref_sides"):
        tiny(ref_sides=[2, 2, 2])
    with pytest.raises(ValueError, match="num_classes"):
        tiny(num_classes=-2)
    model = tiny()
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model("image")
