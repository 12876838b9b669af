"""DynaMixer models (vitattn.models.dynamixer): official names/shapes/counts, the forward
against an independent functional forward written from the official code's structure,
backends, checkpoints, torch.compile, bad input."""

import os

import pytest
import torch
import torch.nn.functional as F

from vitattn import models
import vitattn.models.dynamixer as D

from _util import TRITON_DEVICE
from _models_util import (assert_every_param_has_finite_nonzero_grad, assert_official_layout, assert_registered,
                          bf16_autocast_error, check_compiled_training_grads, check_fused_matches_reference_model,
                          check_convolutions_get_channels_last_inputs, check_layer_norms_get_contiguous_tokens,
                          check_loads_exactly, check_noncontiguous_and_channels_last_inputs, image,
                          jitter_parameters, one_thread)  # noqa: F401 (one_thread: autouse fixture)

DATA = os.path.join(os.path.dirname(__file__), "data", "dynamixer_official_state_dict.json")
PARAMS = {"dynamixer_s": 26_265_960, "dynamixer_m": 57_128_264, "dynamixer_l": 97_818_088}
SMALL = 56  # 8x8 tokens after the 7x7 patch embedding, 4x4 after a transition

# a small model that exercises what the official configs do not: reduced_dim 8 and 1x1
# (width-only) downsampling between stages
TOY = dict(layers=(1, 2, 1, 1), img_size=SMALL, patch_size=7, embed_dims=(16, 32, 32, 48),
           transitions=(False, True, False, False), num_heads=(4, 4, 8, 8), reduced_dims=(8, 2, 8, 2),
           mlp_ratios=(3, 2, 3, 2), num_classes=10)


def _randomize(model, seed=0):
    """Non-trivial weights everywhere (biases, norms, reweighting), not the init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        jitter_parameters(model, g, 0.05, 0.03)
    return model


# ---------------------------------------------------------------- official structure


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_state_dict_match_official(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = getattr(D, name)()
    assert_official_layout(model, DATA, name, PARAMS[name])


def test_registered():
    assert_registered(D, PARAMS)


def test_create_model():
    # create_model imports every model module of the package
    assert set(PARAMS) <= set(models.list_models())
    m = models.create_model("dynamixer_s", img_size=SMALL, num_classes=7)
    assert isinstance(m, D.DynaMixer) and m.head.out_features == 7


def test_official_resolutions_at_224():
    for name in PARAMS:
        cfg = D._CFGS[name]
        assert D.DynaMixer._grids(224, 7, cfg["transitions"], False) == list(cfg["resolutions"])


# ---------------------------------------------------------------- independent functional forward


def _functional_dynamixer(sd, cfg, x):
    """DynaMixer forward from the state_dict alone, structured like the official VisionModel /
    VisionBlock / DynaMixerBlock / DynaMixerOp code (dense mixing matrices, softmax over dim -2)."""
    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))

    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def mlp(t, p):
        return lin(F.gelu(lin(t, p + ".fc1")), p + ".fc2")

    def mix_op(t, p, heads):
        B, L, C = t.shape
        d = sd[p + ".compress.weight"].shape[0] // heads
        w = lin(t, p + ".compress").reshape(B, L, heads, d).permute(0, 2, 1, 3).reshape(B, heads, -1)
        w = lin(w, p + ".generate").reshape(B, heads, L, L).softmax(dim=-2)
        t = t.reshape(B, L, heads, C // heads).permute(0, 2, 3, 1)
        t = torch.matmul(t, w).permute(0, 3, 1, 2).reshape(B, L, C)
        return lin(t, p + ".out")

    def mixer(t, p, heads):
        B, H, W, C = t.shape
        h = mix_op(t.permute(0, 2, 1, 3).reshape(-1, H, C), p + ".mix_h", heads).reshape(B, W, H, C).permute(0, 2, 1, 3)
        w = mix_op(t.reshape(-1, W, C), p + ".mix_w", heads).reshape(B, H, W, C)
        c = lin(t, p + ".mlp_c")
        a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
        a = mlp(a, p + ".reweight").reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
        return lin(h * a[0] + w * a[1] + c * a[2], p + ".proj")

    ps = cfg.get("patch_size", 7)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=ps).permute(0, 2, 3, 1)
    layers, dims, trans = cfg["layers"], cfg["embed_dims"], cfg["transitions"]
    idx = 0
    for i in range(len(layers)):
        for j in range(layers[i]):
            p = f"network.{idx}.{j}"
            x = x + mixer(ln(x, p + ".norm1"), p + ".attn", cfg["num_heads"][i])
            x = x + mlp(ln(x, p + ".norm2"), p + ".mlp")
        idx += 1
        if i == len(layers) - 1:
            break
        if trans[i] or dims[i] != dims[i + 1]:
            s = 2 if trans[i] else 1
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f"network.{idx}.proj.weight"], sd[f"network.{idx}.proj.bias"],
                         stride=s).permute(0, 2, 3, 1)
            idx += 1
    B, H, W, C = x.shape
    x = ln(x.reshape(B, -1, C), "norm")
    return lin(x.mean(1), "head")


def test_eval_matches_functional_official_structure_small_s():
    model = _randomize(D.dynamixer_s(img_size=SMALL)).eval()
    x = image(2, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _functional_dynamixer(model.state_dict(), D._CFGS["dynamixer_s"], x),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_matches_functional_toy(dtype):
    model = _randomize(D.DynaMixer(**TOY)).to(dtype).eval()
    mods = dict(model.named_modules())
    # stage, 1x1 width-only downsample, stage, stride-2 transition, stage, 1x1, stage
    assert [type(m).__name__ for m in model.network] == ["Sequential", "Downsample", "Sequential", "Downsample",
                                                         "Sequential", "Downsample", "Sequential"]
    assert [mods[f"network.{i}.proj"].stride for i in (1, 3, 5)] == [(1, 1), (2, 2), (1, 1)]
    assert model.network[0][0].attn.mix_h.compress.weight.shape == (4 * 8, 16)  # reduced_dim 8
    x = image(2, SMALL).to(dtype)
    with torch.no_grad():
        got, want = model(x), _functional_dynamixer(model.state_dict(), TOY, x)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)


def test_dynamixer_l_block_uses_reduced_dim_8():
    # DynaMixer-L's mixers: compress to 16 heads x 8, generate from 16 * 8 features per row
    with torch.device("meta"):
        model = D.dynamixer_l()
    attn = model.network[2][0].attn
    assert attn.mix_w.compress.weight.shape == (16 * 8, 512)
    assert attn.mix_w.generate.weight.shape == (16 * 16, 16 * 8)


# ---------------------------------------------------------------- full size, backends, autograd


def test_forward_backward_224():
    # the official mixing matrices are sized for 224x224 inputs (32 and 16 tokens per side)
    model = D.dynamixer_s(attn_backend="torch")
    x = image(1, 224)
    out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert_every_param_has_finite_nonzero_grad(model)


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the Triton interpreter is needed to run the fused path on CPU")
def test_fused_triton_matches_torch_backend_values_and_grads():
    model = _randomize(D.DynaMixer(**TOY, attn_backend="torch")).eval()
    fused = D.DynaMixer(**TOY, attn_backend="triton").eval()
    fused.load_state_dict(model.state_dict())
    check_fused_matches_reference_model(model, fused, image(2, SMALL))


def test_attn_backend_is_passed_to_every_mixer(monkeypatch):
    import vitattn.nn.dynamixer as ND

    seen = []
    real = ND.dynamixer

    def spy(x, *args, backend="auto", **kw):
        seen.append((x.shape[-2], backend))
        return real(x, *args, backend=backend, **kw)

    monkeypatch.setattr(ND, "dynamixer", spy)
    model = D.DynaMixer(**TOY, attn_backend="torch").eval()
    with torch.no_grad():
        model(image(1, SMALL))
    # 5 blocks, a column pass and a row pass each; 8 tokens per side in the first 3 blocks,
    # 4 after the transition
    assert seen == [(8, "torch")] * 6 + [(4, "torch")] * 4


def test_noncontiguous_and_channels_last_inputs():
    model = _randomize(D.DynaMixer(**TOY)).eval()
    check_noncontiguous_and_channels_last_inputs(model, lambda: D.DynaMixer(**TOY), image(2, SMALL))


def test_skip_lam_divides_the_branches():
    # skip_lam = 1 skips the division (bitwise the same); any other value divides both branches
    x = torch.randn(2, 8, 8, 16)
    for lam in (1.0, 2.0):
        layer = D.DynaMixerLayer(16, 8, 4, 2, 2.0, skip_lam=lam).eval()
        _randomize(layer)
        with torch.no_grad():
            h = x + layer.attn(layer.norm1(x)) / lam
            want = h + layer.mlp(layer.norm2(h)) / lam
            assert torch.equal(layer(x), want)


def test_layer_norms_get_contiguous_tokens():
    # the patch embedding's and each transition's output enter the stage as contiguous tokens
    check_layer_norms_get_contiguous_tokens(_randomize(D.DynaMixer(**TOY)).eval(), image(2, SMALL))


def test_convolutions_get_channels_last_inputs():
    # the patch embedding's and each transition's convolution
    check_convolutions_get_channels_last_inputs(_randomize(D.DynaMixer(**TOY)).eval(), image(2, SMALL))


def test_cpu_autocast_bf16():
    model = _randomize(D.DynaMixer(**TOY, attn_backend="torch")).eval()
    assert bf16_autocast_error(model, image(2, SMALL)) <= 0.05


def test_drop_path_only_in_training():
    model = _randomize(D.DynaMixer(**TOY, drop_path_rate=0.5))
    x = image(4, SMALL)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # eval is deterministic
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        c = model(x)
    assert (c - a).abs().max() > 1e-4  # some residual branches were dropped


# ---------------------------------------------------------------- checkpoints


def test_strict_load_of_saved_state_dict(tmp_path):
    model = _randomize(D.dynamixer_s(img_size=SMALL)).eval()
    x = image(2, SMALL)
    with torch.no_grad():
        want = model(x)
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    nested = tmp_path / "timm_layout.pth"  # the official (timm) training script nests under "state_dict"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, nested)
    check_loads_exactly(lambda path: D.dynamixer_s(img_size=SMALL, pretrained=path), (plain, nested), x, want)
    sd = model.state_dict()
    sd.pop("norm.weight")
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="norm.weight"):
        D.dynamixer_s(img_size=SMALL, pretrained=tmp_path / "missing.pth")
    with pytest.raises(RuntimeError):  # a 224 model has larger generate layers
        D.dynamixer_s(pretrained=plain)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["torch", "auto"])  # "auto": the models' default
def test_block_under_torch_compile(backend):
    torch._dynamo.reset()
    blk = _randomize(D.DynaMixerLayer(32, 6, 4, 2, 2.0, attn_backend=backend)).eval()
    x = torch.randn(2, 6, 6, 32)
    compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), blk(x), atol=1e-5, rtol=1e-5)
    check_compiled_training_grads(compiled, blk, x)


# ---------------------------------------------------------------- bad input


def test_bad_arguments():
    with pytest.raises(ValueError, match="attn_backend"):
        D.dynamixer_s(img_size=SMALL, attn_backend="fastest")
    with pytest.raises(TypeError, match="attn_backend"):
        D.DynaMixer(**TOY, attn_backend=None)
    with pytest.raises(ValueError, match="attn_backend"):
        D.DynaMixerLayer(32, 6, 4, 2, 2.0, attn_backend="cuda_graphs")
    with pytest.raises(ValueError, match="resolutions"):
        D.DynaMixer(**TOY, resolutions=(32, 16, 16, 16))
    with pytest.raises(ValueError, match="embed_dims"):
        D.DynaMixer(**dict(TOY, embed_dims=(16, 32)))
    with pytest.raises(ValueError, match="img_size"):
        D.dynamixer_s(img_size=0)
    with pytest.raises(ValueError, match="attn_drop_rate"):
        D.dynamixer_s(img_size=SMALL, attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="pretrained"):
        D.dynamixer_s(pretrained=True)
    model = D.DynaMixer(**TOY)
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(1, 3, 2 * SMALL, 2 * SMALL))
