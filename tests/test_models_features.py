"""timm's feature API on every model family: features_only models (list of NCHW maps,
feature_info), forward_intermediates, get_classifier / reset_classifier, input sizes (RMT and
SeTformer any size, SReT with dynamic_img_size, DynaMixer fixed with a clear error), loading a
classification checkpoint into a feature model, export of the feature models."""

import pytest
import torch
import torch.nn.functional as F

import vitattn.models as models
from vitattn.models import _common as common
from vitattn.models import dynamixer as D
from vitattn.models import rmt as R
from vitattn.models import setformer as ST
from vitattn.models import sret as S
from vitattn.models._features import FeatureInfo, take_indices

from _models_util import check_export, images, one_thread, randomize_batchnorm  # noqa: F401

# ---------------------------------------------------------------- small models of every family

SMALL = {
    "rmt": (R.VisRetNet, R.RMT, dict(embed_dims=[16, 32, 32, 48], depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 2],
                                     init_values=[2, 2, 2, 2], heads_ranges=[4, 4, 6, 6], mlp_ratios=[2, 2, 2, 2],
                                     chunkwise_recurrents=[True, True, False, False], projection=24,
                                     layerscales=[False, True, False, True], drop_path_rate=0.0), (64, 96)),
    "sret": (S.SReT, S.SReTFeatures, dict(img_size=64, base_dims=(8, 8, 8), depth=(2, 2, 2), recursive_num=(1, 1, 2),
                                          heads=(2, 2, 4), groups1=(8, 4, 1), groups2=(2, 1, 1), mlp_ratio=2.0,
                                          drop_path_rate=0.0), (64, 64)),
    "dynamixer": (D.DynaMixer, D.DynaMixerFeatures, dict(layers=(1, 2, 1, 1), img_size=56, patch_size=7,
                                                         embed_dims=(16, 32, 32, 48), transitions=(False, True, False, False),
                                                         num_heads=(4, 4, 8, 8), reduced_dims=(8, 2, 8, 2),
                                                         mlp_ratios=(3, 2, 3, 2)), (56, 56)),
    "setformer": (ST.SeTformer, ST.SeTformerFeatures, dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[2, 2, 4, 4],
                                                           ref_sides=[3, 2, 2, 1], mlp_ratio=2.0, drop_path_rate=0.0,
                                                           layer_scale=0.5), (64, 96)),
}
FAMILIES = sorted(SMALL)
LEVELS = {"rmt": 4, "sret": 3, "dynamixer": 4, "setformer": 4}


def randomized(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            randomize_batchnorm(m, g)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.05 if p.dim() < 2 else 0.02))
    return model


def small(family, features=False, **kw):
    cls, fcls, cfg, _ = SMALL[family]
    cfg = dict(cfg, attn_backend="torch", **kw)
    if features:
        return fcls(**cfg)
    return cls(**dict(cfg, num_classes=kw.get("num_classes", 5)))


def small_input(family, b=2, seed=0):
    return images(b, *SMALL[family][3], seed=seed).cpu()


# ---------------------------------------------------------------- feature_info of the named models

# (channels, reductions) of every named model's levels
NAMED = {
    "rmt_t": ([64, 128, 256, 512], [4, 8, 16, 32]), "rmt_s": ([64, 128, 256, 512], [4, 8, 16, 32]),
    "rmt_b": ([80, 160, 320, 512], [4, 8, 16, 32]), "rmt_l": ([112, 224, 448, 640], [4, 8, 16, 32]),
    "sret_t": ([64, 128, 256], [8, 16, 32]), "sret_lt": ([64, 128, 256], [8, 16, 32]),
    "sret_s": ([126, 252, 504], [8, 16, 32]),
    "dynamixer_s": ([192, 384, 384, 384], [7, 14, 14, 14]), "dynamixer_m": ([256, 256, 512, 512], [7, 7, 14, 14]),
    "dynamixer_l": ([256, 512, 512, 512], [7, 14, 14, 14]),
    "setformer_mini": ([64, 128, 256, 512], [4, 8, 16, 32]), "setformer_tiny": ([64, 128, 256, 512], [4, 8, 16, 32]),
    "setformer_small": ([96, 192, 384, 768], [4, 8, 16, 32]), "setformer_base": ([128, 256, 512, 1024], [4, 8, 16, 32]),
}
FEATURE_CLS = {"rmt": R.RMT, "sret": S.SReTFeatures, "dynamixer": D.DynaMixerFeatures, "setformer": ST.SeTformerFeatures}


def test_every_named_model_is_listed_here():
    assert sorted(NAMED) == models.list_models()


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_models_feature_info(name):
    chans, red = NAMED[name]
    with torch.device("meta"):
        cls = models.create_model(name, attn_backend="torch")
        feat = models.create_model(name, features_only=True, attn_backend="torch")
        last2 = models.create_model(name, features_only=True, out_indices=(-2, -1), num_classes=3,
                                    attn_backend="torch")
    assert isinstance(feat, FEATURE_CLS[name.split("_")[0]])
    # the classification model describes every level (iterable as timm's list of dicts)
    assert cls.feature_info.channels() == chans and cls.feature_info.reduction() == red
    assert [d["num_chs"] for d in cls.feature_info] == chans and len(cls.feature_info) == len(chans)
    assert feat.feature_info.channels() == chans and feat.feature_info.reduction() == red
    assert last2.feature_info.channels() == chans[-2:] and last2.feature_info.reduction() == red[-2:]
    assert last2.feature_info.module_name() == cls.feature_info.module_name()[-2:]
    # feature models hold the classifier's weights, minus the head (RMT adds its extra_norms)
    names = set(cls.state_dict())
    extra = {k for k in feat.state_dict() if k not in names}
    assert all(k.startswith("extra_norms.") for k in extra) and (bool(extra) == name.startswith("rmt"))


def test_feature_info_and_take_indices():
    info = FeatureInfo([dict(num_chs=c, reduction=r, module=f"m{i}") for i, (c, r) in
                        enumerate(zip([8, 16, 32], [4, 8, 16]))], (0, 2))
    assert info.channels() == [8, 32] and info.reduction() == [4, 16] and info.module_name() == ["m0", "m2"]
    assert info.channels(1) == 32 and info.get_dicts(keys=["num_chs"]) == [{"num_chs": 8}, {"num_chs": 32}]
    assert info[1]["module"] == "m2" and len(info) == 2
    assert take_indices(4, None) == [0, 1, 2, 3]
    assert take_indices(4, 2) == [2, 3]
    assert take_indices(4, (0, -1)) == [0, 3]
    for bad, err in ((5, ValueError), (0, ValueError), ((4,), ValueError), ((2, 1), ValueError), ((1, 1), ValueError),
                     ([], ValueError), ((1.0,), TypeError), (True, TypeError), ("01", TypeError)):
        with pytest.raises(err, match="indices"):
            take_indices(4, bad)


# ---------------------------------------------------------------- forward_intermediates and features


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_intermediates(family):
    torch.manual_seed(1)
    model = randomized(small(family)).eval()
    x = small_input(family)
    n = LEVELS[family]
    with torch.no_grad():
        logits = model(x)
        feats, maps = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_head(feats), logits, atol=0, rtol=0)
        torch.testing.assert_close(feats, model.forward_features(x), atol=0, rtol=0)
        info = model.feature_info
        assert len(maps) == n
        H, W = x.shape[-2:]
        for m, c, r in zip(maps, info.channels(), info.reduction()):
            assert m.shape == (2, c, -(-H // r), -(-W // r))
        only = model.forward_intermediates(x, indices=(0, -2), intermediates_only=True)
        early = model.forward_intermediates(x, indices=(0, -2), intermediates_only=True, stop_early=True)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    for got, want in ((only, [maps[0], maps[-2]]), (early, [maps[0], maps[-2]]), (last2, maps[-2:])):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(x, indices=(n,))


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_model_loads_a_classification_checkpoint(family, tmp_path):
    torch.manual_seed(2)
    cls = randomized(small(family)).eval()
    torch.save({"model": cls.state_dict(), "epoch": 1}, tmp_path / "cls.pth")
    x = small_input(family, seed=3)
    with torch.no_grad():
        want = cls.forward_intermediates(x, indices=(1, -1), intermediates_only=True)
    feat = small(family, features=True, out_indices=(1, -1))
    assert common.load_features_checkpoint(feat, tmp_path / "cls.pth") is feat
    feat.eval()
    assert isinstance(feat.feature_info, FeatureInfo) and len(feat.feature_info) == 2
    with torch.no_grad():
        got = feat(x)
    assert isinstance(got, list) and len(got) == 2
    if family == "rmt":  # the official backbone normalises every level (extra_norms)
        want = [feat.extra_norms[i](w.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for i, w in zip((1, 3), want)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    # a checkpoint of a feature model of another depth does not fit, and says which keys
    # (RMT's backbone builds every stage whatever out_indices says, as officially)
    other = small(family, features=True, depths=[1, 1, 1, 1]) if family == "rmt" else \
        small(family, features=True, out_indices=(0,))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="missing keys"):
        common.load_features_checkpoint(small(family, features=True), tmp_path / "other.pth")


def test_features_only_through_create_model(tmp_path):
    torch.manual_seed(4)
    cls = randomized(models.create_model("setformer_mini", num_classes=4, attn_backend="torch")).eval()
    torch.save(cls.state_dict(), tmp_path / "mini.pth")
    feat = models.create_model("setformer_mini", features_only=True, out_indices=(0, 2), num_classes=4,
                               pretrained=str(tmp_path / "mini.pth"), attn_backend="torch").eval()
    assert feat.feature_info.channels() == [64, 256]
    assert not hasattr(feat, "head") and len(feat.stages) == 3 and feat.stages[2].downsample is None
    x = images(1, 61, 47).cpu()
    with torch.no_grad():
        want = cls.forward_intermediates(x, indices=(0, 2), intermediates_only=True)
        got = feat(x)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with pytest.raises(ValueError, match="out_indices"):
        models.create_model("setformer_mini", out_indices=(1,))  # needs features_only
    with pytest.raises(TypeError, match="features_only"):
        models.create_model("setformer_mini", features_only="yes")
    with pytest.raises(ValueError, match="feature_cls"):
        models.create_model("setformer_mini", features_only=True, feature_cls="dict")


# ---------------------------------------------------------------- classifier API


@pytest.mark.parametrize("family", FAMILIES)
def test_get_and_reset_classifier(family):
    torch.manual_seed(5)
    model = randomized(small(family)).eval()
    assert model.get_classifier() is model.head
    x = small_input(family)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier() is model.head
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        pooled = model(x)
        assert torch.equal(pooled, model.forward_head(model.forward_features(x), pre_logits=True))
    assert pooled.dim() == 2 and pooled.shape[0] == 2
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


# ---------------------------------------------------------------- input sizes


@pytest.mark.parametrize("family", ["rmt", "setformer"])
@pytest.mark.parametrize("hw", [(37, 53), (31, 31), (96, 40)])
def test_any_input_size(family, hw):
    torch.manual_seed(6)
    feat = randomized(small(family, features=True)).eval()
    x = images(3, *hw, seed=7).cpu()
    with torch.no_grad():
        maps = feat(x)
        one = feat(x[1:2])
    for m, c, r, m1 in zip(maps, feat.feature_info.channels(), feat.feature_info.reduction(), one):
        assert m.shape == (3, c, -(-hw[0] // r), -(-hw[1] // r))
        assert torch.isfinite(m).all()
        torch.testing.assert_close(m1, m[1:2], atol=1e-5, rtol=1e-5)  # batch independent


def test_sret_dynamic_img_size():
    torch.manual_seed(8)
    fixed = randomized(small("sret")).eval()
    dyn = small("sret", dynamic_img_size=True).eval()
    dyn.load_state_dict(fixed.state_dict())  # same parameters: official checkpoints load unchanged
    x = small_input("sret")
    with torch.no_grad():
        assert torch.equal(dyn(x), fixed(x))  # no resampling at the model's own size
    # another size: the position embedding is resampled (bicubic) to the stem's grid
    y = images(2, 128, 96, seed=9).cpu()
    with torch.no_grad():
        got = dyn.forward_intermediates(y, indices=1, intermediates_only=True)[0]
        stem = dyn.patch_embed(y)
        pos = F.interpolate(dyn.pos_embed, size=(16, 12), mode="bicubic", align_corners=False)
        want = dyn.transformers[2](dyn.pools[1](dyn.transformers[1](dyn.pools[0](dyn.transformers[0](stem + pos)))))
    assert got.shape == (2, 32, 4, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    feat = small("sret", features=True, dynamic_img_size=True).eval()
    with torch.no_grad():
        assert [m.shape[-2:] for m in feat(y)] == [(16, 12), (8, 6), (4, 3)]
    with pytest.raises(ValueError, match="dynamic_img_size"):
        fixed(y)
    with pytest.raises(ValueError, match="groups1"):
        dyn(images(1, 72, 72).cpu())  # 9x9 = 81 tokens in stage 0: not divisible into 8 groups
    with pytest.raises(TypeError, match="dynamic_img_size"):
        small("sret", dynamic_img_size="yes")


def test_dynamixer_fixed_size_error_says_why():
    model = small("dynamixer").eval()
    for bad in (images(1, 63, 56).cpu(), images(1, 112, 112).cpu()):
        with pytest.raises(ValueError, match="mixing matrices .* sized by the number of tokens"):
            model(bad)
    feat = small("dynamixer", features=True)
    with pytest.raises(ValueError, match="img_size"):
        feat(images(1, 64, 64).cpu())


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("family", ["rmt", "setformer"])
def test_feature_model_export(family):
    torch.manual_seed(10)
    feat = randomized(small(family, features=True, out_indices=(1, 2, 3))).eval()
    check_export(feat, small_input(family, b=1))
