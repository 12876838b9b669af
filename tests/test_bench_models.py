"""benchmarks/bench_models.py's machinery: the staged official code (imported, then dropped
from sys.modules and sys.path), rows when it is absent, broken or disagreeing, the logit check,
SReT's permutation hand-over, the configuration matrix and the backend record. The timings
themselves are not asserted (benchmarks, not timed tests). The official releases are never
part of the repository: a stand-in "official" module in a temporary folder builds vitattn's
own model through the torch backend, which must agree with "auto" to fp32 rounding."""

import importlib
import os
import sys
import textwrap

import pytest
import torch

import vitattn

from _models_util import one_thread  # noqa: F401 (autouse fixture: one intra-op thread)

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, _BENCH)
    try:
        return importlib.import_module("bench_models")
    finally:
        sys.path.remove(_BENCH)


@pytest.fixture(autouse=True)
def _no_official_env(monkeypatch):
    monkeypatch.delenv("BENCH_OFFICIAL_DIR", raising=False)


def _stage(tmp_path, body: str) -> str:
    """A staged folder whose official_rmt_cls.py has ``body`` and imports a stand-in module."""
    d = tmp_path / "staged"
    d.mkdir()
    (d / "standin_for_timm_xyz.py").write_text("MARK = 1\n")
    (d / "official_rmt_cls.py").write_text("import standin_for_timm_xyz\n" + textwrap.dedent(body))
    return str(d)


_AGREES = """
    import vitattn.models as vm
    def RMT_T3(args):
        return vm.create_model("rmt_t", attn_backend="torch")
"""


def _quick(bench, **kw):
    return bench.run(True, "cpu", ["rmt_t"], res=[64], batches=[1], repeats=1, **kw)


def test_official_rows_with_staged_code(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("VITATTN_CPU_LINEAR", "aten")  # no F.linear row (the next test has it)
    staged = _stage(tmp_path, _AGREES)
    path_before = list(sys.path)
    rows = _quick(bench, official_dir=staged)
    # the staged modules are gone again: they must never shadow real packages later
    assert "official_rmt_cls" not in sys.modules and "standin_for_timm_xyz" not in sys.modules
    assert sys.path == path_before
    assert [r["method"] for r in rows] == ["vitattn:auto", "official"]
    auto, official = rows
    assert auto["role"] == "auto" and official["role"] == "naive"
    assert official["logits_rel_diff"] < bench.LOGITS_RTOL
    assert official["note"] == "" and "unavailable" not in official
    assert auto["vs_official_infer_speedup"] == pytest.approx(official["fwd_ms"] / auto["fwd_ms"])
    assert auto["vs_official_infer_paired"] > 0  # the median of the per-round ratios
    assert "fwd_bwd_ms" not in auto and "vs_torch_infer_speedup" not in auto  # quick: inference only, no torch row
    # every op the model ran, with the backends "auto" chose: "depthwise_conv2d_nhwc:..., masa:..."
    used = dict(part.split(":") for part in auto["backend"].split(", "))
    assert set(used) == {"masa", "depthwise_conv2d_nhwc"}, auto["backend"]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["infer_peak_mib"] > 0 and r["threads"] == 1 and r["dtype"] == "float32"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")
def test_f_linear_row_where_the_models_run_onednn(bench, tmp_path, monkeypatch):
    # where the models' linear layers run oneDNN, a third row runs the same model on F.linear
    # (VITATTN_CPU_LINEAR=aten around its calls): the attention ops' share of the speed-up
    monkeypatch.setenv("VITATTN_CPU_LINEAR", "onednn")
    rows = _quick(bench, official_dir=_stage(tmp_path, _AGREES))
    assert [r["method"] for r in rows] == ["vitattn:auto", "official", bench.ATEN_LINEAR]
    auto, official, aten = rows
    assert aten["role"] == "backend" and aten["logits_rel_diff"] < bench.LOGITS_RTOL
    assert aten["vs_official_infer_speedup"] == pytest.approx(official["fwd_ms"] / aten["fwd_ms"])
    assert "vs_official_infer_speedup" in auto
    assert os.environ["VITATTN_CPU_LINEAR"] == "onednn"  # restored after the row's calls
    # without the official code there is nothing for the row to be compared with
    assert bench.ATEN_LINEAR not in [r["method"] for r in _quick(bench)]


def test_official_dir_from_the_environment_and_with_torch(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("VITATTN_CPU_LINEAR", "aten")
    monkeypatch.setenv("BENCH_OFFICIAL_DIR", _stage(tmp_path, _AGREES))
    rows = _quick(bench, with_torch=True)
    assert [r["method"] for r in rows] == ["vitattn:auto", "official", "vitattn:torch"]
    auto = rows[0]
    assert {"vs_official_infer_speedup", "vs_torch_infer_speedup"} <= set(auto)
    assert rows[2]["logits_rel_diff"] < bench.LOGITS_RTOL


def test_disagreeing_official_logits_are_flagged(bench, tmp_path):
    staged = _stage(tmp_path, _AGREES + """
    _real = RMT_T3
    def RMT_T3(args):
        m = _real(args)
        m.register_forward_hook(lambda mod, inp, out: out + 1.0)
        return m
    """)
    official = _quick(bench, official_dir=staged)[1]
    assert official["logits_rel_diff"] > bench.LOGITS_RTOL
    assert "LOGITS DISAGREE" in official["note"]


@pytest.mark.parametrize("case", ["absent", "broken", "no_fn", "missing_dir"])
def test_official_not_available_reasons(bench, tmp_path, case):
    if case == "broken":
        staged = _stage(tmp_path, "raise ImportError('no module named timm here')\n")
    elif case == "no_fn":
        staged = _stage(tmp_path, "X = 1\n")
    elif case == "missing_dir":
        staged = str(tmp_path / "nowhere")
    else:
        staged = None
    got = bench.load_official(staged, ["rmt_t", "setformer_tiny"])
    want = {"absent": "BENCH_OFFICIAL_DIR", "broken": "no module named timm here", "no_fn": "has no RMT_T3",
            "missing_dir": "is not a folder"}[case]
    assert isinstance(got["rmt_t"], str) and want in got["rmt_t"]
    if staged is not None and case != "missing_dir":
        assert got["setformer_tiny"] == "no official release of this model"
    assert "standin_for_timm_xyz" not in sys.modules and "official_rmt_cls" not in sys.modules


def test_rows_without_the_official_code(bench):
    rows = _quick(bench)
    assert [r["method"] for r in rows] == ["vitattn:auto", "official", "vitattn:torch"]
    auto, official, ref = rows
    why = official["unavailable"]["fwd_ms"]
    assert official["fwd_ms"] is None and why.startswith("official: not available") and "BENCH_OFFICIAL_DIR" in why
    # the torch backend is the baseline, and the row says so
    assert "official not available" in auto["note"]
    assert auto["vs_torch_infer_speedup"] == pytest.approx(ref["fwd_ms"] / auto["fwd_ms"])
    assert ref["logits_rel_diff"] < bench.LOGITS_RTOL


def test_official_size_limits_are_reported(bench):
    # the official SReT / DynaMixer are built for 224x224: other sizes say so (nothing is built)
    official = {"sret_t": ("mod", bench.OFFICIAL["sret_t"])}
    rows = bench.measure("sret_t", 64, 1, torch.device("cpu"), [1], official["sret_t"], training=False, repeats=1,
                         with_torch=False)
    assert rows[1]["method"] == "official" and "224x224 only" in rows[1]["unavailable"]["fwd_ms"]


def test_torch_with_perms_hands_out_vitattn_permutations(bench):
    perms = [torch.tensor([2, 0, 1]), torch.tensor([1, 0])]
    proxy = bench._TorchWithPerms(perms)
    assert torch.equal(proxy.randperm(3), perms[0]) and torch.equal(proxy.randperm(2), perms[1])
    assert proxy.argsort is torch.argsort  # everything else is torch
    with pytest.raises(RuntimeError, match="more permutations"):
        proxy.randperm(2)
    with pytest.raises(RuntimeError, match="permutation of 4"):
        bench._TorchWithPerms([torch.tensor([0, 1])]).randperm(4)


def test_sret_permutations_are_recorded_in_call_order(bench):
    from vitattn.models import sret as S

    real = S.group_attention
    model = vitattn.models.create_model("sret_t", img_size=64, attn_backend="torch").eval()
    with bench._perms_used_by_vitattn() as used, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert S.group_attention is real
    # stage 1 (groups2 = 2) has two shared blocks, each permuted in its recursive pass
    fixed = [m.eval_perm for m in model.modules() if isinstance(m, S.GroupAttention) and m.eval_perm is not None]
    assert len(used) == 2 and all(torch.equal(a, b) for a, b in zip(used, fixed))


def test_record_backends_restores_the_dispatchers(bench):
    q = torch.randn(1, 2, 5, 6, 8)
    disp = vitattn._ops()["masa"][1]
    with bench.record_backends() as seen:
        vitattn.masa(q, q, q, 0.9, backend="torch")
    assert seen == {"masa": {"torch"}}
    assert "choose" not in vars(disp)
    assert bench.backend_label({"masa": {"cpu", "torch"}, "dynamixer": {"cpu"}}) == "dynamixer:cpu, masa:cpu/torch"


def test_perturbed_state_keeps_non_parameter_buffers(bench):
    model = vitattn.models.create_model("rmt_t")
    before = model.state_dict()
    after = bench.perturbed_state(model)
    params = {n for n, _ in model.named_parameters()}
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        if k in params or k.endswith(("running_mean", "running_var")):
            assert changed, k
        else:  # RMT's angle/decay buffers, BatchNorm's counter
            assert not changed, k


def test_configs(bench):
    full = bench.configs_for(False)
    assert {(m, 224, b) for m in ("rmt_t", "rmt_s", "sret_t", "dynamixer_s") for b in (1, 8)} <= set(full)
    assert {("rmt_t", 512, 1), ("rmt_t", 512, 8)} <= set(full) and len(full) == 10
    assert bench.configs_for(True) == [("rmt_t", 224, 1)]
    # a model picked alone keeps its sizes of the matrix; --res replaces them
    assert bench.configs_for(False, ["rmt_t", "sret_t"], batches=[8]) == [("rmt_t", 224, 8), ("rmt_t", 512, 8),
                                                                             ("sret_t", 224, 8)]
    assert bench.configs_for(False, ["rmt_b"]) == [("rmt_b", 224, 1), ("rmt_b", 224, 8)]
    assert bench.configs_for(False, ["rmt_t"], res=[64], batches=[2]) == [("rmt_t", 64, 2)]
    with pytest.raises(ValueError, match="unknown model"):
        bench.configs_for(False, ["rmt_x"])


def test_goals_report(bench):
    rows = [dict(role="auto", model="rmt_t", res=224, batch=8, threads=1, shape="rmt_t 224x224 b8",
                 vs_official_infer_speedup=1.4, vs_official_infer_paired=1.35),
            dict(role="auto", model="rmt_t", res=512, batch=1, threads=1, shape="rmt_t 512x512 b1",
                 vs_official_infer_speedup=2.0),
            dict(role="auto", model="sret_t", res=224, batch=8, threads=1, shape="sret_t 224x224 b8"),
            dict(role="auto", model="rmt_t", res=224, batch=8, threads=2, shape="rmt_t 224x224 b8",
                 vs_official_infer_speedup=0.5)]
    text = bench.goals_report(rows)
    assert ("rmt_t 224x224 b8: inference 1.40x the official code (per-round ratios: median 1.35x) "
            "(goal >= 1.3x): met") in text
    assert "rmt_t 512x512 b1: inference 2.00x the official code (goal >= 2.5x): NOT met" in text
    assert "sret_t 224x224 b8: no official comparison" in text
    assert "0.50x" not in text  # the goals are stated for one thread
