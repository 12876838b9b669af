"""The models in timm's registry, and through the REAL timm package.

* Registration happens at ``import vitattn.models`` without importing the model modules or
  building a model (checked in a subprocess, against a stand-in timm so that it runs everywhere,
  and against the real timm where it is installed).
* With the real timm: ``timm.create_model`` of every family (classification and
  ``features_only=True`` with ``out_indices``), timm's ``checkpoint_path`` loading, its data
  config and optimizer factory on our models.

Where timm is not installed the real-timm tests skip, saying so. CI runs this file in the
virtual environment .ci/run makes for timm (see the README, "Models") with
VITATTN_TEST_REQUIRE_TIMM=1: there a missing or broken timm fails instead of skipping.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vitattn.models as models
from vitattn import _env

from _models_util import images, one_thread  # noqa: F401

REQUIRE_TIMM = _env.flag("VITATTN_TEST_REQUIRE_TIMM")
try:
    import timm
    import timm.data
    import timm.optim
except Exception as exc:  # absent, or its torchvision import fails against this torch
    if REQUIRE_TIMM:
        raise
    timm = None
    _NO_TIMM = f"timm is not importable here ({type(exc).__name__}: {exc}); CI runs these tests in its timm environment"
else:
    _NO_TIMM = ""

needs_timm = pytest.mark.skipif(timm is None, reason=_NO_TIMM)

_MODEL_MODULES = ("vitattn.models.rmt", "vitattn.models.sret", "vitattn.models.dynamixer", "vitattn.models.setformer")


def _run(code: str, *, path=None) -> str:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


# ---------------------------------------------------------------- registration (stand-in timm)


def test_import_registers_every_model_without_building_one(tmp_path):
    # a stand-in timm that records what is registered (found before any installed timm)
    pkg = tmp_path / "timm"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text(textwrap.dedent("""
        registry = {}
        def is_model(name):
            return name in registry
        def register_model(fn):
            registry[fn.__name__] = fn
            return fn
    """))
    out = _run(f"""
        import sys
        import timm.models
        import vitattn.models as vm
        assert sorted(timm.models.registry) == vm.list_models(), sorted(timm.models.registry)
        loaded = [m for m in {_MODEL_MODULES!r} if m in sys.modules]
        assert loaded == [], loaded  # registering imported no model module
        # as timm.create_model calls an entrypoint: its own arguments are accepted and dropped
        model = timm.models.registry["sret_t"](pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                                               cache_dir=None, img_size=64, attn_backend="torch")
        print(type(model).__name__, "vitattn.models.sret" in sys.modules, "vitattn.models.rmt" in sys.modules)
    """, path=tmp_path)
    assert out.split() == ["SReT", "True", "False"]  # only the model's own module was imported


def test_registration_survives_a_broken_timm(tmp_path):
    pkg = tmp_path / "timm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('operator torchvision::nms does not exist')\n")
    out = _run("""
        import vitattn.models as vm
        print(len(vm.list_models()))
    """, path=tmp_path)
    assert out.split() == ["14"]


# ---------------------------------------------------------------- the real timm

# small inputs (and sizes) per family, so that every model runs in seconds on a CPU
FAMILY_CASES = {
    "rmt_t": (dict(), (64, 96)),
    "sret_t": (dict(img_size=64), (64, 64)),
    "dynamixer_s": (dict(img_size=56), (56, 56)),
    "setformer_mini": (dict(), (61, 45)),
}


@needs_timm
def test_real_timm_registry_at_import():
    out = _run(f"""
        import sys
        import vitattn.models as vm
        import timm
        names = vm.list_models()
        assert set(names) <= set(timm.list_models()), sorted(set(names) - set(timm.list_models()))
        assert all(timm.is_model(n) for n in names)
        loaded = [m for m in {_MODEL_MODULES!r} if m in sys.modules]
        assert loaded == [], loaded
        print(timm.__version__)
    """)
    assert out.strip() == timm.__version__


@needs_timm
@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_real_timm_features_only(name):
    kw, hw = FAMILY_CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, features_only=True, out_indices=(1, 2), attn_backend="torch", **kw).eval()
    want_cls = models.create_model(name, features_only=True, out_indices=(1, 2), attn_backend="torch", **kw)
    assert type(model) is type(want_cls)
    info = model.feature_info
    assert len(info) == 2 and len(info.channels()) == 2
    x = images(2, *hw).cpu()
    with torch.no_grad():
        maps = model(x)
    assert isinstance(maps, list) and len(maps) == 2
    for m, c, r in zip(maps, info.channels(), info.reduction()):
        assert m.shape == (2, c, -(-hw[0] // r), -(-hw[1] // r))
        assert torch.isfinite(m).all()


@needs_timm
@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_real_timm_classification_and_checkpoint_path(name, tmp_path):
    kw, hw = FAMILY_CASES[name]
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=3, attn_backend="torch", **kw).eval()
    x = images(2, *hw).cpu()
    with torch.no_grad():
        logits = model(x)
        feats, maps = model.forward_intermediates(x)
        assert torch.equal(model.forward_head(feats), logits)
    assert logits.shape == (2, 3) and len(maps) == len(model.feature_info)
    assert model.get_classifier() is model.head
    # timm's own checkpoint loading (strict) into a fresh model gives the same logits
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pth")
    loaded = timm.create_model(name, num_classes=3, attn_backend="torch", checkpoint_path=str(tmp_path / "ckpt.pth"),
                               **kw).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)
    # timm's data config and optimizer factory work on our models
    cfg = timm.data.resolve_model_data_config(model)
    assert cfg["input_size"][0] == 3 and len(cfg["mean"]) == 3
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape[0] == 2
    with pytest.raises(ValueError, match="download"):
        timm.create_model(name, pretrained=True)
