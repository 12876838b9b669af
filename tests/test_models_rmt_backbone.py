"""RMT as the official detection / segmentation backbone (vitattn.models.rmt.RMT): official
state_dict layout and arguments, feature maps against the official math at odd sizes, norm_eval,
checkpoints (backbone, detector, classification with the head dropped), and full MaSA at
detection resolution in bounded memory."""

import inspect
import json
import os
import sys

import pytest
import torch
from torch import nn

import vitattn.models as models
import vitattn.models.rmt as rmt

from _models_util import cpu_alloc_peak_mib, images, official_retention, one_thread, randomize_batchnorm  # noqa: F401

DATA = os.path.join(os.path.dirname(__file__), "data", "rmt_backbone_official_state_dict.json")

# the official backbone's signature (qhfan/RMT detect/mmdet/models/backbones/RMT.py), defaults included
OFFICIAL_ARGS = dict(in_chans=3, out_indices=(0, 1, 2, 3), embed_dims=[96, 192, 384, 768], depths=[2, 2, 6, 2],
                     num_heads=[3, 6, 12, 24], init_values=[1, 1, 1, 1], heads_ranges=[3, 3, 3, 3],
                     mlp_ratios=[3, 3, 3, 3], drop_path_rate=0.1, norm_layer=nn.LayerNorm, patch_norm=True,
                     use_checkpoint=False, chunkwise_recurrents=[True, True, False, False], projection=1024,
                     layerscales=[False, False, False, False], layer_init_values=1e-6, norm_eval=True)


def tiny_cfg(**kw):
    cfg = dict(embed_dims=[16, 32, 32, 48], depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 2], init_values=[2, 2, 2, 2],
               heads_ranges=[4, 4, 6, 6], mlp_ratios=[2, 2, 2, 2], chunkwise_recurrents=[True, True, False, False],
               layerscales=[False, True, False, True], drop_path_rate=0.0)
    cfg.update(kw)
    return cfg


def randomized(model, seed=0):
    """Every parameter moved off its init and non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            randomize_batchnorm(m, g)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.05 if p.dim() < 2 else 0.02))
    return model


# ---------------------------------------------------------------- official layout and arguments


@pytest.mark.parametrize("size", ["t", "s", "b", "l"])
def test_state_dict_layout_equals_the_official_backbone(size):
    with open(DATA) as f:
        want = json.load(f)["models"][size]
    with torch.device("cpu" if size == "t" else "meta"):  # layout only for the big ones
        model = rmt.rmt_backbone(size)
    assert sum(p.numel() for p in model.parameters()) == want["params"]
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(want["state_dict"].items())


def test_backbone_configs_are_the_classification_ones():
    # the official detection / segmentation configs use each classifier's hyper-parameters
    for size, name in (("t", "rmt_t"), ("s", "rmt_s"), ("b", "rmt_b"), ("l", "rmt_l")):
        cfg = rmt.BACKBONE_CFGS[size]
        for k, v in rmt._CFGS[name].items():
            assert cfg[k] == v, (size, k)
        assert cfg["out_indices"] == (0, 1, 2, 3)
    assert rmt.BACKBONE_CFGS["t"]["chunkwise_recurrents"] == [True, True, False, False]  # stage 3 full MaSA
    with torch.device("meta"):
        b, m = rmt.rmt_backbone("b"), rmt.rmt_backbone("m")  # the official "m" is our "b"
    assert [(k, v.shape) for k, v in b.state_dict().items()] == [(k, v.shape) for k, v in m.state_dict().items()]
    with pytest.raises(ValueError, match="size"):
        rmt.rmt_backbone("xl")


def test_constructor_takes_the_official_arguments():
    params = inspect.signature(rmt.RMT).parameters
    for name, default in OFFICIAL_ARGS.items():
        assert name in params, name
        got = params[name].default
        assert (list(got) if isinstance(got, tuple) and isinstance(default, list) else got) == default, name
    with torch.device("meta"):
        model = rmt.RMT(**OFFICIAL_ARGS)
    assert model.out_indices == (0, 1, 2, 3) and model.norm_eval is True
    assert [m.normalized_shape for m in model.extra_norms] == [(96,), (192,), (384,), (768,)]
    assert all(m.eps == 1e-5 for m in model.extra_norms)  # nn.LayerNorm's default, as officially


def test_features_only_builds_the_backbone():
    with torch.device("meta"):
        model = models.create_model("rmt_s", features_only=True, out_indices=(1, 3), attn_backend="torch")
    assert isinstance(model, rmt.RMT)
    assert model.out_indices == (1, 3)
    assert model.feature_info.channels() == [128, 512]
    assert model.feature_info.reduction() == [8, 32]
    assert model.feature_info.module_name() == ["layers.1", "layers.3"]
    ref = rmt.rmt_backbone("s", out_indices=(1, 3))
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]


# ---------------------------------------------------------------- feature maps


def _dense_official(model, x):
    """The official backbone's forward written out: dense fp64 retention (official_retention)
    in every block, then the per-level LayerNorms; returns every level."""
    x = model.patch_embed(x)
    outs = []
    for i, layer in enumerate(model.layers):
        H, W = x.shape[1:3]
        rp = layer.Relpos
        for blk in layer.blocks:
            x = x + blk.pos(x)
            a = official_retention(blk.retention, blk.retention_layer_norm(x), rp.initial_value, rp.heads_range,
                                   layer.chunkwise_recurrent)
            x = x + (blk.gamma_1 * a if blk.layerscale else a)
            f = blk.ffn(blk.final_layer_norm(x))
            x = x + (blk.gamma_2 * f if blk.layerscale else f)
        outs.append(model.extra_norms[i](x).permute(0, 3, 1, 2))
        if layer.downsample is not None:
            x = layer.downsample(x)
    return outs


@pytest.mark.parametrize("hw", [(37, 29), (64, 96), (33, 8)])
def test_feature_maps_match_the_official_math_at_any_size(hw):
    torch.manual_seed(1)
    model = randomized(rmt.RMT(**tiny_cfg(), attn_backend="torch")).double().eval()
    x = images(2, *hw, torch.float64).cpu()
    with torch.no_grad():
        got = model(x)
        want = _dense_official(model, x)
    H, W = hw
    for i, (g, w) in enumerate(zip(got, want)):
        s = 2 ** (i + 2)  # every stride-2 conv pads: ceil
        assert g.shape == (2, model.embed_dims[i], -(-H // s), -(-W // s)) and g.is_contiguous()
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9)


def test_backbone_equals_the_classifier_intermediates():
    torch.manual_seed(2)
    cls = randomized(rmt.VisRetNet(**tiny_cfg(), num_classes=5, attn_backend="torch")).eval()
    bb = rmt.RMT(**tiny_cfg(), out_indices=(0, 2, 3), attn_backend="torch").eval()
    randomized(bb.extra_norms, 3)
    missing, unexpected = bb.load_state_dict(cls.state_dict(), strict=False)
    assert set(unexpected) == {k for k in cls.state_dict() if k.split(".")[0] in ("proj", "norm", "head")}
    assert all(k.startswith("extra_norms.") for k in missing)
    x = images(1, 45, 70).cpu()
    with torch.no_grad():
        feats, maps = cls.forward_intermediates(x)
        got = bb(x)
        torch.testing.assert_close(cls.forward_head(feats), cls(x), atol=0, rtol=0)
    want = [bb.extra_norms[i](maps[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for i in (0, 2, 3)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_out_indices():
    torch.manual_seed(3)
    full = rmt.RMT(**tiny_cfg(), attn_backend="torch").eval()
    x = images(1, 40, 56).cpu()
    with torch.no_grad():
        every = full(x)
        for idx, want in (((0, 1, 2, 3), [0, 1, 2, 3]), ((2,), [2]), ((-1,), [3]), (2, [2, 3]), ((0, 3), [0, 3])):
            part = rmt.RMT(**tiny_cfg(), out_indices=idx, attn_backend="torch").eval()
            part.load_state_dict(full.state_dict())
            assert part.out_indices == tuple(want)
            got = part(x)
            assert isinstance(got, list) and len(got) == len(want)
            for g, i in zip(got, want):
                assert torch.equal(g, every[i])
    for bad, err in (((0, 0), ValueError), ((4,), ValueError), ((3, 1), ValueError), ((), ValueError),
                     (("1",), TypeError), (0, ValueError)):
        with pytest.raises(err, match="out_indices"):
            rmt.RMT(**tiny_cfg(), out_indices=bad)


# ---------------------------------------------------------------- norm_eval


@pytest.mark.parametrize("norm_eval", [True, False])
def test_norm_eval_keeps_batchnorm_statistics(norm_eval):
    torch.manual_seed(4)
    model = rmt.RMT(**tiny_cfg(drop_path_rate=0.2), norm_eval=norm_eval, attn_backend="torch")
    assert model.train() is model  # the official override returns None
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4 + 3  # the stem's four and one per PatchMerging
    assert all(m.training is not norm_eval for m in bns)
    others = [m for m in model.modules() if not isinstance(m, nn.BatchNorm2d)]
    assert all(m.training for m in others)  # drop path, dropout etc. still train
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    sum(o.sum() for o in model(images(2, 32, 48).cpu())).backward()
    changed = [k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])]
    assert (changed == []) is norm_eval
    model.eval()
    assert not any(m.training for m in model.modules())
    # a SyncBatchNorm (what a multi-GPU detector converts to) is kept in eval mode too
    model = nn.SyncBatchNorm.convert_sync_batchnorm(rmt.RMT(**tiny_cfg(), norm_eval=True))
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.SyncBatchNorm))
    with pytest.raises(TypeError, match="norm_eval"):
        rmt.RMT(**tiny_cfg(), norm_eval=1)


# ---------------------------------------------------------------- checkpoints


def _backbone_and_input(seed=5):
    torch.manual_seed(seed)
    return randomized(rmt.RMT(**tiny_cfg(), attn_backend="torch")).eval(), images(1, 36, 52).cpu()


def test_backbone_and_detector_checkpoints_load_strictly(tmp_path):
    src, x = _backbone_and_input()
    sd = src.state_dict()
    with torch.no_grad():
        want = src(x)
    detector = {"backbone." + k: v for k, v in sd.items()}
    detector.update({"neck.lateral_convs.0.conv.weight": torch.randn(8, 16, 1, 1), "rpn_head.rpn_cls.bias": torch.zeros(3)})
    for name, obj in (("plain.pth", sd), ("mmdet.pth", {"meta": {"epoch": 12}, "state_dict": detector})):
        torch.save(obj, tmp_path / name)
        # the same backend as src: the comparison is bitwise
        dst = rmt.load_backbone_checkpoint(rmt.RMT(**tiny_cfg(), attn_backend="torch"), tmp_path / name)
        with torch.no_grad():
            assert all(torch.equal(g, w) for g, w in zip(dst.eval()(x), want)), name
        dst = rmt.RMT(**tiny_cfg(), attn_backend="torch")
        dst.init_weights(pretrained=str(tmp_path / name))  # the official mmdet 2.x hook
        with torch.no_grad():
            assert all(torch.equal(g, w) for g, w in zip(dst.eval()(x), want))
    # strict: a missing backbone key (even an extra_norms one) or a shape mismatch is an error
    bad = dict(sd)
    bad.pop("extra_norms.1.weight")
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="extra_norms.1.weight"):
        rmt.load_backbone_checkpoint(rmt.RMT(**tiny_cfg()), tmp_path / "missing.pth")
    bad = dict(sd)
    bad["layers.9.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "unexpected.pth")
    with pytest.raises(RuntimeError, match="layers.9.weight"):
        rmt.load_backbone_checkpoint(rmt.RMT(**tiny_cfg()), tmp_path / "unexpected.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        rmt.load_backbone_checkpoint(rmt.RMT(**tiny_cfg(embed_dims=[16, 32, 32, 64])), tmp_path / "plain.pth")
    with pytest.raises(TypeError, match="pretrained"):
        rmt.RMT(**tiny_cfg()).init_weights(pretrained=3)
    with pytest.raises(ValueError, match="path"):
        rmt.load_backbone_checkpoint(rmt.RMT(**tiny_cfg()), tmp_path / "absent.pth")


def test_classification_checkpoint_loads_with_the_head_dropped(tmp_path):
    torch.manual_seed(6)
    cls = randomized(rmt.rmt_t(num_classes=10, attn_backend="torch")).eval()  # bb's backend
    torch.save({"model": cls.state_dict(), "epoch": 300}, tmp_path / "rmt_t.pth")  # the official training layout
    bb = models.create_model("rmt_t", features_only=True, pretrained=str(tmp_path / "rmt_t.pth"),
                             attn_backend="torch").eval()
    fresh_norms = rmt.rmt_backbone("t").extra_norms
    for k, v in bb.state_dict().items():
        if k.startswith("extra_norms."):  # not in a classification checkpoint: they keep their init
            assert torch.equal(v, fresh_norms.state_dict()[k[len("extra_norms."):]]), k
        else:
            assert torch.equal(v, cls.state_dict()[k]), k
    x = images(1, 64, 96).cpu()
    with torch.no_grad():
        maps = cls.forward_intermediates(x, intermediates_only=True)
        got = bb(x)
    for i, (g, m) in enumerate(zip(got, maps)):
        w = bb.extra_norms[i](m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    # the same through the named configuration and the mmdet hook
    other = rmt.rmt_backbone("t", pretrained=str(tmp_path / "rmt_t.pth"))
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in other.state_dict().items())
    # a classification checkpoint of another size does not fit
    small = rmt.VisRetNet(**tiny_cfg(), num_classes=3)
    torch.save(small.state_dict(), tmp_path / "tiny_cls.pth")
    with pytest.raises(RuntimeError):
        rmt.rmt_backbone("t", pretrained=str(tmp_path / "tiny_cls.pth"))


# ---------------------------------------------------------------- full MaSA at detection resolution


@pytest.mark.parametrize("backend, mode", [("torch", "eval"), ("auto", "eval"), ("auto", "train")])
def test_full_masa_stage_at_detection_resolution_in_bounded_memory(backend, mode):
    """RMT-T's stage 2 as in the official detection config (full MaSA, 8 heads; 2 blocks, narrow
    channels: the (heads, N, N) sizes do not depend on the width) on its 800x1344 token grid."""
    H, W = 800 // 16, 1344 // 16  # 50 x 84 = 4200 tokens
    # one fp32 (heads, N, N) tensor is 538 MiB; the official code holds the mask, the logits and
    # the probabilities of every block (and keeps them for backward when training)
    dense_mib = 8 * (H * W) ** 2 * 4 / 2**20
    torch.manual_seed(7)
    stage = rmt.BasicLayer(embed_dim=16, out_dim=None, depth=2, num_heads=8, init_value=2, heads_range=6,
                           ffn_dim=16, drop_path=[0.0, 0.0], chunkwise_recurrent=False, downsample=False,
                           attn_backend=backend)
    x = torch.randn(1, H, W, 16, requires_grad=mode == "train")
    if mode == "train":
        peak = cpu_alloc_peak_mib(lambda: stage.train().forward_blocks(x).square().mean().backward())
        assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    else:
        with torch.no_grad():
            peak = cpu_alloc_peak_mib(lambda: stage.eval().forward_blocks(x))
    assert peak < dense_mib / 4, (peak, dense_mib)


# ---------------------------------------------------------------- OpenMMLab registration and the FPN example


def _fake_registry_modules(monkeypatch, names):
    """Stand-ins for mmdet / mmseg registries: objects with register_module and module_dict."""
    import types

    class Registry:
        def __init__(self):
            self.module_dict = {}

        def register_module(self, name=None, module=None):
            self.module_dict[name] = module

    regs = {}
    for full in names:
        mod_name, attr = full.rsplit(".", 1)
        parts = mod_name.split(".")
        for i in range(1, len(parts) + 1):
            monkeypatch.setitem(sys.modules, ".".join(parts[:i]),
                                sys.modules.get(".".join(parts[:i])) or types.ModuleType(".".join(parts[:i])))
        regs[full] = Registry()
        setattr(sys.modules[mod_name], attr, regs[full])
    return regs


def test_openmmlab_registration_and_init_cfg(monkeypatch, tmp_path):
    import importlib

    for m in ("mmdet", "mmseg", "mmdet.registry", "mmseg.registry", "mmdet.models", "mmdet.models.builder",
              "mmseg.models", "mmseg.models.builder"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    regs = _fake_registry_modules(monkeypatch, ["mmdet.registry.MODELS", "mmseg.models.builder.BACKBONES"])
    monkeypatch.delitem(sys.modules, "vitattn.models.openmmlab", raising=False)
    omm = importlib.import_module("vitattn.models.openmmlab")
    assert sorted(omm.REGISTERED) == ["mmdet.registry.MODELS", "mmseg.models.builder.BACKBONES"]
    for reg in regs.values():
        assert reg.module_dict["VitattnRMT"] is omm.VitattnRMT
    # what a config's backbone=dict(type="VitattnRMT", ...) builds, and the runner's init_weights()
    torch.manual_seed(8)
    cls = randomized(rmt.VisRetNet(**tiny_cfg(), num_classes=4))
    torch.save({"state_dict": cls.state_dict()}, tmp_path / "cls.pth")
    bb = omm.VitattnRMT(**tiny_cfg(), init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "cls.pth")))
    bb.init_weights()
    assert all(torch.equal(v, cls.state_dict()[k]) for k, v in bb.state_dict().items() if not k.startswith("extra"))
    with pytest.raises(ValueError, match="init_cfg"):
        omm.VitattnRMT(**tiny_cfg(), init_cfg=dict(type="Kaiming"))


def test_fpn_example_trains_on_an_odd_size():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "fpn_detection.py")
    spec = importlib.util.spec_from_file_location("fpn_detection_example", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    torch.manual_seed(9)
    model = ex.SegmentationModel(rmt.RMT(**tiny_cfg(), attn_backend="torch"), num_classes=3, fpn_channels=8)
    x = images(2, 61, 45).cpu()
    pyramid = model.fpn(model.backbone(x))
    assert [p.shape[-2:] for p in pyramid] == [(16, 12), (8, 6), (4, 3), (2, 2)]
    logits = model.train()(x)
    assert logits.shape == (2, 3, 61, 45)
    torch.nn.functional.cross_entropy(logits, torch.randint(3, (2, 61, 45))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
