"""SReT models (vitattn.models.sret): official names/shapes/counts, the forward against an
independent functional forward written from the official code's structure, backends,
permutation switches, checkpoints, torch.compile, bad input."""

import os

import pytest
import torch
import torch.nn.functional as F

import vitattn
from vitattn import models
from vitattn import random_permutation
import vitattn.models.sret as S

from _util import TRITON_DEVICE
from _models_util import (assert_every_param_has_finite_nonzero_grad, assert_official_layout, assert_registered,
                          bf16_autocast_error, check_compiled_training_grads, check_fused_matches_reference_model,
                          check_convolutions_get_channels_last_inputs, check_layer_norms_get_contiguous_tokens,
                          check_loads_exactly, check_noncontiguous_and_channels_last_inputs, image,
                          jitter_parameters, one_thread, randomize_batchnorm)  # noqa: F401 (one_thread: autouse)

DATA = os.path.join(os.path.dirname(__file__), "data", "sret_official_state_dict.json")
PARAMS = {"sret_t": 4_755_979, "sret_lt": 4_988_024, "sret_s": 20_899_692}
SMALL = 64  # smallest convenient image size whose token counts divide the official groups


def _randomize(model, seed=0):
    """Non-trivial weights everywhere (coefficients, norms, BN statistics), not the init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        jitter_parameters(model, g, 0.05, 0.05)
        for m in model.modules():
            randomize_batchnorm(m, g)
    return model


# ---------------------------------------------------------------- official structure


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_count_and_state_dict_match_official(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = getattr(S, name)()
    # shared blocks appear twice in the module tree; parameters() counts them once, as officially
    assert_official_layout(model, DATA, name, PARAMS[name])


def test_registered():
    assert_registered(S, PARAMS)


def test_create_model():
    # create_model imports every model module of the package
    assert set(PARAMS) <= set(models.list_models())
    m = models.create_model("sret_t", img_size=SMALL, num_classes=7)
    assert isinstance(m, S.SReT) and m.head.out_features == 7


def test_shared_blocks_are_shared():
    model = S.sret_t(img_size=SMALL)
    for stage, depth, rec in zip(model.transformers, (4, 10, 6), (2, 5, 3)):
        blocks = stage.blocks
        assert len(blocks) == 2 * depth
        for b in range(rec):
            first = 4 * b  # [block, nll, block again, nll] per shared block
            assert blocks[first] is blocks[first + 2]
            assert isinstance(blocks[first], S.SReTBlock)
            assert isinstance(blocks[first + 1], S.NonLinearProjection)
            assert blocks[first + 1] is not blocks[first + 3]
        assert stage._recursive == [(i + 2) % 4 == 0 for i in range(2 * depth)]


# ---------------------------------------------------------------- independent functional forward


def _functional_sret(sd, cfg, x, perm_of):
    """SReT forward from the state_dict alone, structured like the official code: the RT list
    index i marks the recursive pass by (i + 2) % 4 == 0; the official attention reshapes
    qkv to (B, G, N/G, 3, heads, d) after permuting the tokens with x[:, idx]."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)

    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd[p + ".bias"])

    def mlp(t, p):
        return lin(F.gelu(lin(t, p + ".fc1")), p + ".fc2")

    def attn(t, p, heads, groups, perm):
        B, N, C = t.shape
        if perm is not None:
            t = t[:, perm, :]
        qkv = lin(t, p + ".qkv").reshape(B, groups, N // groups, 3, heads, C // heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        o = (a @ v).transpose(2, 3).reshape(B, groups, N // groups, C).permute(0, 3, 1, 2).reshape(B, C, N).transpose(1, 2)
        if perm is not None:
            o = o[:, torch.argsort(perm), :]
        return lin(o, p + ".proj")

    for i in (1, 2, 3):
        p = f"patch_embed.conv{i}"
        x = F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride=2, padding=1)
        b = f"patch_embed.bn{i}"
        x = F.relu(F.batch_norm(x, sd[b + ".running_mean"], sd[b + ".running_var"], sd[b + ".weight"],
                                sd[b + ".bias"], False, 0.0, 1e-5))
    x = x + sd["pos_embed"]
    for s in range(3):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        for i in range(2 * cfg["depth"][s]):
            p = f"transformers.{s}.blocks.{i}"
            c = lambda j: sd[f"{p}.coefficient{j}.bias"]
            if i % 2:  # NLL
                t = t * c(1) + c(2) * mlp(ln(t, p + ".norm1"), p + ".mlp")
                continue
            rec = (i + 2) % 4 == 0
            groups = cfg["groups2"][s] if rec else cfg["groups1"][s]
            perm = perm_of(s, i) if (rec and groups != 1) else None
            t = t * c(1) + c(2) * attn(ln(t, p + ".norm1"), p + ".attn", cfg["heads"][s], groups, perm)
            t = t * c(3) + c(4) * mlp(ln(t, p + ".norm2"), p + ".mlp")
        x = t.transpose(1, 2).reshape(B, C, H, W)
        if s < 2:
            x = F.conv2d(x, sd[f"pools.{s}.conv.weight"], sd[f"pools.{s}.conv.bias"], stride=2, padding=1, groups=C)
    x = ln(x.mean((2, 3)), "norm")
    return lin(x, "head")


@pytest.mark.parametrize("name", ["sret_t", "sret_s"])
def test_eval_matches_functional_official_structure(name):
    model = _randomize(getattr(S, name)(img_size=SMALL)).eval()
    cfg = S._CFGS[name]
    x = image(2, SMALL)
    with torch.no_grad():
        got = model(x)
        fixed = lambda s, i: model.transformers[s].blocks[i].attn.eval_perm
        want = _functional_sret(model.state_dict(), cfg, x, fixed)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # "off": the recursive pass groups contiguous tokens
        model.set_eval_permutation("off")
        got_off = model(x)
        want_off = _functional_sret(model.state_dict(), cfg, x, lambda s, i: torch.arange(SMALL * SMALL // 64))
        torch.testing.assert_close(got_off, want_off, atol=1e-5, rtol=1e-4)
    # the permutation matters (a test that could not tell them apart would prove nothing)
    assert (got - got_off).abs().max() > 1e-3


def test_training_matches_functional_with_seeded_permutations():
    model = _randomize(S.sret_t(img_size=SMALL, drop_path_rate=0.0)).train()
    for m in model.modules():  # BN on running statistics so the functional forward can match
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = image(2, SMALL)
    model.seed_permutations(123)
    got = model(x)
    # the same draws in the same order: one per recursive pass of a shared block with groups2 > 1
    gen = torch.Generator().manual_seed(123)
    drawn = []

    def perm_of(s, i):
        drawn.append(random_permutation(SMALL * SMALL // 64, device="cpu", generator=gen))
        return drawn[-1]

    with torch.no_grad():
        want = _functional_sret(model.state_dict(), S._CFGS["sret_t"], x, perm_of)
    assert len(drawn) == 2  # stage 1 only: groups2 = [2, 1, 1]
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-4)
    # training permutations are fresh per call, reproducible per seed
    model.seed_permutations(123)
    torch.testing.assert_close(model(x), got, atol=0, rtol=0)
    assert (model(x) - got).abs().max() > 1e-4  # the generator moved on: new permutations
    model.seed_permutations(None)  # back to the global generator
    torch.manual_seed(7)
    a = model(x)
    torch.manual_seed(7)
    torch.testing.assert_close(model(x), a, atol=0, rtol=0)


# ---------------------------------------------------------------- full size, backends, autograd


def test_forward_backward_224():
    # the official models need 224x224 (the position embedding is 28x28)
    model = S.sret_t(attn_backend="torch")
    x = image(1, 224)
    out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert_every_param_has_finite_nonzero_grad(model)  # coefficients included


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the Triton interpreter is needed to run the fused path on CPU")
def test_fused_triton_matches_torch_backend_values_and_grads():
    model = _randomize(S.sret_t(img_size=SMALL, drop_path_rate=0.0)).eval()
    fused = S.sret_t(img_size=SMALL, drop_path_rate=0.0, attn_backend="triton").eval()
    fused.load_state_dict(model.state_dict())
    for m in fused.modules():  # identical fixed permutations (same seeds) in both
        if isinstance(m, S.GroupAttention) and m.eval_perm is not None:
            assert m.eval_perm.numel() == SMALL * SMALL // 64
    model.attn_backend = "torch"
    check_fused_matches_reference_model(model, fused, image(2, SMALL))


def test_attn_backend_is_passed_to_every_attention(monkeypatch):
    ga = S  # the model module calls the group_attention it imported from vitattn

    seen = []
    real = ga.group_attention

    def spy(q, k, v, groups, *, perm=None, scale=None, backend="auto"):
        seen.append((groups, perm is not None, backend))
        return real(q, k, v, groups, perm=perm, scale=scale, backend=backend)

    monkeypatch.setattr(ga, "group_attention", spy)
    model = S.sret_t(img_size=SMALL, attn_backend="torch").eval()
    with torch.no_grad():
        model(image(1, SMALL))
    # 20 block applications: stage 1 (2 shared blocks x 2), stage 2 (5 x 2), stage 3 (3 x 2)
    assert len(seen) == 20 and all(b == "torch" for _, _, b in seen)
    want = [(8, False), (2, True)] * 2 + [(4, False), (1, False)] * 5 + [(1, False)] * 6
    assert [(g, p) for g, p, _ in seen] == want


def test_group_attention_layer_gradcheck_fp64():
    layer = S.GroupAttention(8, 2, groups1=2, groups2=2, attn_backend="torch", num_tokens=6).double().eval()
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    for recursive in (False, True):
        assert torch.autograd.gradcheck(lambda t: layer(t, recursive), (x,), eps=1e-6, atol=1e-7)


def test_noncontiguous_and_channels_last_inputs():
    model = _randomize(S.sret_t(img_size=SMALL)).eval()
    check_noncontiguous_and_channels_last_inputs(model, lambda: S.sret_t(img_size=SMALL), image(2, SMALL))


def test_layer_norms_get_contiguous_tokens():
    # each stage's (B, C, H, W) input enters the residual stream as contiguous (B, N, C) tokens
    check_layer_norms_get_contiguous_tokens(_randomize(S.sret_t(img_size=SMALL)).eval(), image(2, SMALL))


def test_convolutions_get_channels_last_inputs():
    # the stem's three convolutions and the pooling between stages
    check_convolutions_get_channels_last_inputs(_randomize(S.sret_t(img_size=SMALL)).eval(), image(2, SMALL))


def test_cpu_autocast_bf16():
    model = _randomize(S.sret_t(img_size=SMALL, attn_backend="torch")).eval()
    # bf16 has ~3 significant digits; 20 blocks deep
    assert bf16_autocast_error(model, image(2, SMALL)) <= 0.05


def test_float64_model():
    model = _randomize(S.sret_t(img_size=SMALL)).double().eval()
    x = image(1, SMALL).double()
    with torch.no_grad():
        out = model(x)
        want = _functional_sret(model.state_dict(), S._CFGS["sret_t"], x,
                                lambda s, i: model.transformers[s].blocks[i].attn.eval_perm)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-9)


# ---------------------------------------------------------------- permutation switches, determinism


def test_eval_determinism_and_switches():
    model = _randomize(S.sret_t(img_size=SMALL)).eval()
    x = image(2, SMALL)
    with torch.no_grad():
        a, b = model(x), model(x)
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # "fixed" (default)
        # the fixed permutations depend only on the seed, and are drawn on the CPU
        twin = S.sret_t(img_size=SMALL).eval()
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(twin(x), a, atol=0, rtol=0)
        perms = [m.eval_perm for m in model.modules() if isinstance(m, S.GroupAttention) and m.eval_perm is not None]
        assert len(perms) == 2 and not torch.equal(perms[0], perms[1])  # one per shared block
        for p in perms:
            assert torch.equal(p.sort().values, torch.arange(p.numel()))
        model.set_eval_permutation("fixed", seed=5)
        c = model(x)
        assert (c - a).abs().max() > 1e-4
        model.set_eval_permutation("fixed", seed=0)
        torch.testing.assert_close(model(x), a, atol=0, rtol=0)
        # "random": a fresh permutation every call, as the official code does in eval
        model.set_eval_permutation("random")
        model.seed_permutations(3)
        r1, r2 = model(x), model(x)
        assert (r1 - r2).abs().max() > 1e-4
        model.seed_permutations(3)
        torch.testing.assert_close(model(x), r1, atol=0, rtol=0)
        # "off": deterministic, differs from the permuted result
        model.set_eval_permutation("off")
        o1, o2 = model(x), model(x)
        torch.testing.assert_close(o1, o2, atol=0, rtol=0)
        assert (o1 - a).abs().max() > 1e-4
    # the constructor switch does the same
    m2 = S.sret_t(img_size=SMALL, eval_permutation="off").eval()
    m2.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m2(x), o1, atol=0, rtol=0)
    # back from "off" to "fixed": the same permutations, redrawn at once (not lazily in forward)
    model.set_eval_permutation("fixed")
    again = [m.eval_perm for m in model.modules() if isinstance(m, S.GroupAttention) and m.eval_perm is not None]
    assert len(again) == 2 and all(torch.equal(a, b) for a, b in zip(again, perms))
    # the fixed permutations are not part of the (official) state_dict
    assert not any("perm" in k for k in model.state_dict())


# ---------------------------------------------------------------- checkpoints


def test_strict_load_of_saved_state_dict(tmp_path):
    model = _randomize(S.sret_t(img_size=SMALL)).eval()
    x = image(2, SMALL)
    with torch.no_grad():
        want = model(x)
    plain = tmp_path / "plain.pth"
    torch.save(model.state_dict(), plain)
    nested = tmp_path / "official_layout.pth"  # official checkpoints keep the weights under "model"
    torch.save({"model": model.state_dict(), "epoch": 3}, nested)
    check_loads_exactly(lambda path: S.sret_t(img_size=SMALL, pretrained=path), (plain, nested, str(nested)), x, want)
    # strict: a missing or an extra key is an error
    sd = model.state_dict()
    sd.pop("head.bias")
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="head.bias"):
        S.sret_t(img_size=SMALL, pretrained=tmp_path / "missing.pth")
    # a differently shaped model does not load
    with pytest.raises(RuntimeError):
        S.sret_lt(img_size=SMALL, pretrained=plain)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["torch", "auto"])  # "auto": the models' default
def test_block_under_torch_compile(backend):
    torch._dynamo.reset()
    blk = S.SReTBlock(64, 2, groups1=4, groups2=2, mlp_ratio=2.0, attn_backend=backend, num_tokens=32)
    _randomize(blk).eval()
    x = torch.randn(2, 32, 64)
    compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for recursive in (False, True):
            torch.testing.assert_close(compiled(x, recursive), blk(x, recursive), atol=1e-5, rtol=1e-5)
    # training: gradients through the compiled graph equal eager ones (first pass: no permutation)
    check_compiled_training_grads(compiled, blk, x, False)
    # the recursive pass draws its permutation inside the graph
    y = compiled(x, True)
    assert y.shape == x.shape and torch.isfinite(y).all()


# ---------------------------------------------------------------- bad input


def test_bad_arguments():
    with pytest.raises(ValueError, match="attn_backend"):
        S.sret_t(attn_backend="fastest")
    with pytest.raises(TypeError, match="attn_backend"):
        S.sret_t(attn_backend=1)
    with pytest.raises(ValueError, match="eval_permutation"):
        S.sret_t(eval_permutation="sometimes")
    with pytest.raises(ValueError, match="img_size"):
        S.sret_t(img_size=100)
    with pytest.raises(ValueError, match="groups1"):
        S.sret_t(img_size=40)  # 5x5 tokens in stage 1 cannot form 8 groups
    with pytest.raises(TypeError, match="img_size"):
        S.sret_t(img_size=224.0)
    with pytest.raises(TypeError, match="permutation_seed"):
        S.sret_t(img_size=SMALL, permutation_seed=1.5)
    with pytest.raises(ValueError, match="attn_drop_rate"):
        S.sret_t(attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="pretrained"):
        S.sret_t(pretrained=True)
    with pytest.raises(ValueError, match="path"):
        S.sret_t(pretrained="/nonexistent/sret_t.pth")
    model = S.sret_t(img_size=SMALL)
    with pytest.raises(ValueError, match="mode"):
        model.set_eval_permutation("never")
    with pytest.raises(TypeError, match="seed"):
        model.seed_permutations("1")
    with pytest.raises(ValueError, match="input"):
        model(torch.randn(1, 3, 2 * SMALL, 2 * SMALL))


def test_meta_construction_then_to_empty_and_redraw():
    model = _randomize(S.sret_t(img_size=SMALL)).eval()
    with torch.device("meta"):
        fast = S.sret_t(img_size=SMALL)
    fast = fast.to_empty(device="cpu")
    fast.load_state_dict(model.state_dict())
    fast.set_eval_permutation("fixed")  # the fixed permutations are not in the state_dict
    fast.eval()
    x = image(1, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=0, rtol=0)
