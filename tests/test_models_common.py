"""Model helpers shared by every model: registry, local-checkpoint loading, timm registration,
DropPath, argument checks, and the model benchmark's machinery."""

import importlib
import os
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import vitattn.models as models
from vitattn.models import _common as common

from _models_util import one_thread  # noqa: F401 (autouse fixture: one intra-op thread)

EXPECTED = {"rmt_t", "rmt_s", "rmt_b", "rmt_l", "sret_t", "sret_lt", "sret_s", "dynamixer_s", "dynamixer_m",
            "dynamixer_l", "setformer_mini", "setformer_tiny", "setformer_small", "setformer_base"}


# ---------------------------------------------------------------- registry


def test_list_models_has_every_issue_model():
    names = models.list_models()
    assert set(names) == EXPECTED
    assert names == sorted(names)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_model_builds_and_checks_its_arguments(name):
    with torch.device("meta"):  # layout only: no memory, no init cost
        model = models.create_model(name, attn_backend="torch", num_classes=10)
        assert model.head.out_features == 10
        assert sum(p.numel() for p in model.parameters()) > 1e6
        assert getattr(models, name) is models._MODELS[name]
        with pytest.raises(ValueError, match="attn_backend"):
            models.create_model(name, attn_backend="no-such-backend")
        with pytest.raises(ValueError, match="pretrained"):
            models.create_model(name, pretrained=True)  # would need a download
        with pytest.raises(ValueError, match="path"):
            models.create_model(name, pretrained="/nonexistent/checkpoint.pth")
        # timm's create_model passes these; every constructor must accept and ignore them
        models.create_model(name, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None)


def test_create_model_bad_names():
    with pytest.raises(ValueError, match="unknown model"):
        models.create_model("rmt_xxl")
    with pytest.raises(TypeError, match="name"):
        models.create_model(3)
    with pytest.raises(AttributeError):
        models.no_such_model


def test_pretrained_round_trip_through_create_model(tmp_path):
    torch.manual_seed(0)
    src = models.create_model("setformer_mini", num_classes=5).eval()
    torch.save({"model": src.state_dict(), "optimizer": {}, "epoch": 1}, tmp_path / "ckpt.pth")
    dst = models.create_model("setformer_mini", num_classes=5, pretrained=os.fspath(tmp_path / "ckpt.pth")).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


# ---------------------------------------------------------------- load_pretrained


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)


def _fresh_pair(seed=0):
    torch.manual_seed(seed)
    src = Net()
    with torch.no_grad():
        src.bn.running_mean.normal_()
    return src, Net()


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "model_state_dict", "ddp"])
def test_load_pretrained_layouts(tmp_path, layout):
    src, dst = _fresh_pair()
    sd = src.state_dict()
    obj = {
        "plain": sd,
        "model": {"model": sd, "epoch": 7, "args": "namespace"},
        "state_dict": {"state_dict": sd},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {}},
        "ddp": {"model": {"module." + k: v for k, v in sd.items()}},
    }[layout]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    assert common.load_pretrained(dst, path) is dst  # os.PathLike accepted
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_pretrained_is_strict(tmp_path):
    src, dst = _fresh_pair()
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="extra.weight"):
        common.load_pretrained(dst, str(tmp_path / "extra.pth"))
    sd = src.state_dict()
    del sd["bn.running_var"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="running_var"):
        common.load_pretrained(dst, str(tmp_path / "missing.pth"))


def test_load_pretrained_bad_input(tmp_path):
    net = Net()
    with pytest.raises(TypeError, match="model"):
        common.load_pretrained({"fc": 1}, "x.pth")
    with pytest.raises(TypeError, match="path"):
        common.load_pretrained(net, 3)
    with pytest.raises(TypeError, match="path"):
        common.load_pretrained(net, True)
    with pytest.raises(ValueError, match="path"):
        common.load_pretrained(net, str(tmp_path / "absent.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state_dict"):
        common.load_pretrained(net, str(tmp_path / "list.pth"))
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="nested state_dict"):
        common.load_pretrained(net, str(tmp_path / "meta.pth"))


def test_build_arguments():
    built = common.build("net", lambda **kw: Net(), False, {}, {"pretrained_cfg": {}, "cache_dir": None})
    assert isinstance(built, Net)
    with pytest.raises(TypeError, match="pretrained"):
        common.build("net", lambda **kw: Net(), 1.5, {}, {})
    with pytest.raises(ValueError, match="pretrained"):
        common.build("net", lambda **kw: Net(), True, {}, {})


def test_check_attn_backend():
    assert common.check_attn_backend("m", "torch", "masa") == "torch"
    with pytest.raises(TypeError, match="attn_backend"):
        common.check_attn_backend("m", None, "masa")
    with pytest.raises(ValueError, match="attn_backend"):
        common.check_attn_backend("m", "fast", "masa")


# every family's op: its attn_backend is checked at construction against that op's own backends
FAMILY_OPS = {"rmt_t": "masa", "sret_t": "group_attention", "dynamixer_s": "dynamixer", "setformer_mini": "ot_attention"}


@pytest.mark.parametrize("name", sorted(FAMILY_OPS))
def test_attn_backend_checked_against_the_models_op(name):
    import vitattn

    op = FAMILY_OPS[name]
    allowed = vitattn.backends(op)
    assert "auto" in allowed and "torch" in allowed
    with torch.device("meta"):
        for backend in ("auto", "cuda", "triton", "cpu", "torch"):
            if backend in allowed:
                assert models.create_model(name, attn_backend=backend).attn_backend == backend
            else:  # e.g. "cuda" for SReT: group attention has no such backend; the model says so when built
                with pytest.raises(ValueError, match=f"attn_backend must be one of the {op} op's backends"):
                    models.create_model(name, attn_backend=backend)


# ---------------------------------------------------------------- DropPath


def test_drop_path():
    x = torch.randn(4000, 3, 5) + 2.0
    dp = common.DropPath(0.25)
    dp.eval()
    assert dp(x) is x
    dp.train()
    torch.manual_seed(0)
    y = dp(x)
    ratio = y / x
    per_sample = ratio.flatten(1)
    # every sample is either dropped whole or kept and rescaled by 1 / (1 - p)
    dropped = (per_sample == 0).all(1)
    kept = torch.isclose(per_sample, torch.full_like(per_sample, 1 / 0.75)).all(1)
    assert bool((dropped | kept).all())
    assert abs(dropped.float().mean().item() - 0.25) < 0.03  # 4000 Bernoulli draws
    assert common.DropPath(0.0).train()(x) is x
    with pytest.raises(ValueError, match="drop_prob"):
        common.DropPath(1.0)
    with pytest.raises(ValueError, match="drop_prob"):
        common.DropPath(-0.1)


# ---------------------------------------------------------------- timm registration


def test_maybe_register_timm_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError

    def my_model(pretrained=False, **kw):
        return Net()

    assert common.maybe_register_timm(my_model) is my_model


def _fake_timm(monkeypatch, existing=()):
    registry = {name: None for name in existing}
    timm = types.ModuleType("timm")
    timm_models = types.ModuleType("timm.models")
    timm_models.is_model = lambda name: name in registry

    def register_model(fn):
        registry[fn.__name__] = fn
        return fn

    timm_models.register_model = register_model
    timm.models = timm_models
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", timm_models)
    return registry


def test_maybe_register_timm_with_timm(monkeypatch):
    registry = _fake_timm(monkeypatch, existing=("resnet50",))
    seen = {}

    def vitattn_probe_model(pretrained=False, **kw):
        seen.update(kw, pretrained=pretrained)
        return common.build("vitattn_probe_model", lambda **k: Net(), pretrained, {}, kw)

    assert common.maybe_register_timm(vitattn_probe_model) is vitattn_probe_model
    entry = registry["vitattn_probe_model"]
    assert entry is not vitattn_probe_model and entry.__name__ == "vitattn_probe_model"
    # as timm.create_model calls an entrypoint
    net = entry(pretrained=False, pretrained_cfg={"url": ""}, pretrained_cfg_overlay=None)
    assert isinstance(net, Net) and seen["pretrained"] is False

    def resnet50(pretrained=False, **kw):
        return Net()

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert common.maybe_register_timm(resnet50) is resnet50
    assert registry["resnet50"] is None  # timm's own model left in place
    assert any("already has a model" in str(x.message) for x in w)


def test_maybe_register_timm_survives_a_broken_timm(monkeypatch):
    registry = _fake_timm(monkeypatch)

    def boom(fn):
        raise RuntimeError("registry API changed")

    sys.modules["timm.models"].register_model = boom

    def another_model(pretrained=False, **kw):
        return Net()

    with pytest.warns(UserWarning, match="could not register"):
        assert common.maybe_register_timm(another_model) is another_model
    assert "another_model" not in registry


# ---------------------------------------------------------------- the model benchmark


def test_bench_models_rows(monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        bench = importlib.import_module("bench_models")
    finally:
        sys.path.pop(0)
    monkeypatch.delenv(bench.OFFICIAL_DIR_ENV, raising=False)  # no official code: the torch backend is the baseline
    rows = bench.run(True, "cpu", ["rmt_t"], res=[64], batches=[1], training=True)
    assert [r["method"] for r in rows] == ["vitattn:auto", "official", "vitattn:torch"]
    auto, official, ref = rows
    assert official["fwd_ms"] is None and "not available" in official["unavailable"]["fwd_ms"]
    for r in (auto, ref):
        assert r["model"] == "rmt_t" and r["res"] == 64 and r["batch"] == 1 and r["threads"] == 1
        assert abs(r["params_m"] - 14.334216) < 1e-9
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        # a training step holds activations for backward: more than inference needs
        assert r["train_peak_mib"] > r["infer_peak_mib"] > 0
        assert r["peak_mib"] == r["train_peak_mib"]
    assert ref["logits_rel_diff"] < bench.LOGITS_RTOL
    assert auto["vs_torch_infer_speedup"] == pytest.approx(ref["fwd_ms"] / auto["fwd_ms"])
    assert auto["vs_torch_train_speedup"] == pytest.approx(ref["fwd_bwd_ms"] / auto["fwd_bwd_ms"])
    assert "official not available" in auto["note"]
    assert set(bench.COLUMNS) >= {"fwd_ms", "fwd_bwd_ms", "infer_peak_mib", "train_peak_mib"}


@pytest.mark.parametrize("name", sorted(FAMILY_OPS))
def test_inference_mode_matches_no_grad(name):
    """Deployment runs under torch.inference_mode, whose tensors carry no version counter:
    every family's forward must run there and give the no_grad logits."""
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = model(x)
    for _ in range(2):  # the second call meets whatever the first one cached
        with torch.inference_mode():
            got = model(x)
        assert got.is_inference()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
