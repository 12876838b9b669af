"""ONNX export (vitattn/ops/_onnx.py, vitattn/ops/<op>/onnx_impl.py).

* every op (both MaSA forms, sinkhorn, ot_aggregate, ot_attention, group attention with and
  without a permutation, dynamixer) exports with ``torch.onnx.export(..., dynamo=True)`` to
  standard ONNX operators only, and onnxruntime (CPU) gives PyTorch's output (relative error
  <= 1e-4, fp32) on the export inputs and on new ones;
* above the dense budget the exported graph is blocked: no intermediate holds the N x N
  logits (the decomposed MaSA form never does);
* every model family (reduced depth and width through the constructors, classifier and
  features_only model) and one full named model (rmt_t at 224^2) export and match;
* the export branch runs only under ONNX export: eager calls, torch.compile and a plain
  torch.export keep the custom ops.

Exports are slow (tens of seconds per model on the shared 2-core CPU): the cases of one kind
share one exported module.
"""

from __future__ import annotations

import math
import os

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import vitattn
from vitattn.models import dynamixer as D
from vitattn.models import rmt as R
from vitattn.models import setformer as ST
from vitattn.models import sret as S
from vitattn._tiles import dense_elems
from vitattn.ops import _onnx

from _models_util import jitter_parameters, one_thread, randomize_batchnorm  # noqa: F401

TOL = 1e-4  # relative error (max |ort - torch| / max |torch|), fp32


def export(module: nn.Module, args, **kw) -> onnx.ModelProto:
    """The user's call: torch.onnx.export(module, args, dynamo=True) (kw: dynamic_shapes)."""
    return torch.onnx.export(module, tuple(args), dynamo=True, verbose=False, **kw).model_proto


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the CPU is shared
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, args):
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    assert len(feeds) == len(sess.get_inputs()) == len(args)
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    return ((got - want).abs().max() / want.abs().max()).item()


def flat(out):
    return [t for o in out for t in flat(o)] if isinstance(out, (list, tuple)) else [out]


def standard_ops_only(proto: onnx.ModelProto) -> set:
    """The graph's operator types, after checking that every node (local functions included)
    is a standard ONNX operator and no vitattn custom op is left."""
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}, {n.domain for n in nodes}
    return {n.op_type for n in nodes}


# ---------------------------------------------------------------- every op


def _masa_args(g, B):
    # (B, H, W, heads, d) projections permuted to (B, heads, H, W, d) inside the module: strided views
    q, k = (torch.randn(B, 5, 7, 3, 8, generator=g) for _ in range(2))
    v = torch.randn(B, 5, 7, 3, 6, generator=g)
    gamma = torch.rand(3, generator=g) * 0.5 + 0.45  # per-head decays in (0, 1], an input of the graph
    return (q, k, v, gamma)


def _masa(decomposed):
    def f(q, k, v, gamma):
        p = lambda t: t.permute(0, 3, 1, 2, 4)
        return vitattn.masa(p(q), p(k), p(v), gamma, decomposed=decomposed)
    return f


def _qkv(g, B, N):
    return tuple(torch.randn(B, 3, N, 8 if i < 2 else 5, generator=g) for i in range(3))


FILTER_1D = vitattn.gaussian_filter_1d(11, 5, sigma=0.3)
FILTER_2D = vitattn.gaussian_filter_2d(3, 3, 4, sigma=0.5)
L, C, SEG, DC = 6, 8, 2, 3  # dynamixer: tokens per row, channels, segments, compressed dim per segment

OPS = {
    # name: (inputs from a generator and a batch size, function of the inputs, the inputs with a batch dim 0)
    "masa_full": (_masa_args, _masa(False), (0, 1, 2)),
    "masa_decomposed": (_masa_args, _masa(True), (0, 1, 2)),
    "sinkhorn": (lambda g, B: (torch.randn(B, 3, 6, 7, generator=g), torch.rand(B, 3, 6, generator=g) + 0.5),
                 lambda s, a: vitattn.sinkhorn(s, eps=0.3, iters=3, a=a), (0, 1)),
    "ot_aggregate": (lambda g, B: (torch.randn(B, 3, 11, 4, generator=g), torch.randn(3, 5, 4, generator=g),
                                   torch.randn(B, 3, 11, 6, generator=g)),
                     lambda x, ref, v: vitattn.ot_aggregate(x, ref, v, eps=0.5, iters=3, pos_filter=FILTER_1D), (0, 2)),
    "ot_attention": (lambda g, B: (torch.randn(B, 2, 9, 4, generator=g), torch.randn(2, 4, 4, generator=g)),
                     lambda x, ref: vitattn.ot_attention(x, ref, eps=0.5, iters=2, pos_filter=FILTER_2D), (0,)),
    "group_attention": (lambda g, B: _qkv(g, B, 12), lambda q, k, v: vitattn.group_attention(q, k, v, 3), (0, 1, 2)),
    # the permutation is an input of the graph here (in SReT it is a buffer, a constant); made by
    # random_permutation, so it is known valid and its value check (data-dependent) is not traced
    "group_attention_perm": (lambda g, B: _qkv(g, B, 12) + (vitattn.random_permutation(12, generator=g),),
                             lambda q, k, v, perm: vitattn.group_attention(q, k, v, 4, perm=perm, scale=0.3),
                             (0, 1, 2)),
    # x (B, W, H, C) transposed to mix along H, as DynaMixer's column pass does
    "dynamixer": (lambda g, B: (torch.randn(B, L, 4, C, generator=g), torch.randn(SEG * DC, C, generator=g) * 0.3,
                                torch.randn(SEG * DC, generator=g), torch.randn(L * L, L * DC, generator=g) * 0.3,
                                torch.randn(L * L, generator=g)),
                  lambda x, wc, bc, wg, bg: vitattn.dynamixer(x.transpose(1, 2), wc, bc, wg, bg, SEG), (0,)),
    "dynamixer_no_bias": (lambda g, B: (torch.randn(B, L, C, generator=g), torch.randn(SEG * DC, C, generator=g) * 0.3,
                                        torch.randn(L * L, L * DC, generator=g) * 0.3),
                          lambda x, wc, wg: vitattn.dynamixer(x, wc, None, wg, None, SEG), (0,)),
    # x (B, H, W, C) channels-last, a 3x5 kernel with padding (1, 2) as RMT's convolutions
    "depthwise_conv2d_nhwc": (lambda g, B: (torch.randn(B, 5, 7, 6, generator=g), torch.randn(6, 1, 3, 5, generator=g),
                                            torch.randn(6, generator=g)),
                              lambda x, w, b: vitattn.depthwise_conv2d_nhwc(x, w, b, (1, 2)), (0,)),
}


class AllOps(nn.Module):
    """Every case of a table like OPS side by side: one export for all (each export costs
    seconds of fixed work)."""

    def __init__(self, cases, counts, record=None):
        super().__init__()
        self.cases, self.counts, self.record = cases, counts, record

    def forward(self, *flat_args):
        if self.record is not None:
            self.record.append(_onnx.exporting())
        outs, i = [], 0
        for name, case in self.cases.items():
            n = self.counts[name]
            outs.append(case[1](*flat_args[i:i + n]))
            i += n
        return tuple(outs)


def _inputs(cases, seed, B=2):
    """({case: number of inputs}, every case's inputs in one flat list, whether each has a batch dim)."""
    g = torch.Generator().manual_seed(seed)
    per_case = {name: case[0](g, B) for name, case in cases.items()}
    batched = [i in case[2] for name, case in cases.items() for i in range(len(per_case[name]))]
    return {n: len(a) for n, a in per_case.items()}, [t for a in per_case.values() for t in a], batched


@pytest.fixture(scope="module")
def ops_exported():
    """Every op in one export, with a dynamic batch dimension (exported at batch 2)."""
    seen = []
    counts, args, batched = _inputs(OPS, 0)
    module = AllOps(OPS, counts, seen).eval()
    batch = torch.export.Dim("batch")
    proto = export(module, args, dynamic_shapes=(tuple({0: batch} if b else None for b in batched),))
    return module, proto, session(proto), seen


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_exports_and_runs_in_onnxruntime(ops_exported, name):
    module, proto, sess, _ = ops_exported
    standard_ops_only(proto)
    i = list(OPS).index(name)
    module.record = None
    # the export inputs, new values through the same graph, and another batch size
    for seed, B in ((0, 2), (1, 2), (2, 3)):
        counts, x, _ = _inputs(OPS, seed, B)
        assert counts == module.counts
        got = run(sess, x)[i]
        with torch.no_grad():
            want = module(*x)[i]
        assert rel_err(got, want) <= TOL, (name, seed, B, rel_err(got, want))


def test_export_branch_ran_only_while_exporting(ops_exported):
    _, _, _, seen = ops_exported
    assert seen and all(seen)  # every trace of the module saw the flag
    assert not _onnx.exporting()


def test_torchscript_exporter_too():
    """The legacy exporter (dynamo=False) traces the same decompositions."""
    import io

    counts, args, _ = _inputs(OPS, 2)
    module = AllOps(OPS, counts).eval()
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation warning
        torch.onnx.export(module, tuple(args), buf, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    standard_ops_only(proto)
    got = run(session(proto), args)
    with torch.no_grad():
        want = module(*args)
    for name, a, b in zip(OPS, got, want):
        assert rel_err(a, b) <= TOL, name


# ---------------------------------------------------------------- bounded memory above the dense budget


def _largest_intermediate(proto: onnx.ModelProto) -> int:
    inferred = onnx.shape_inference.infer_shapes(proto)
    sizes = []
    for vi in inferred.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), vi.name  # static shapes everywhere
        sizes.append(math.prod(d.dim_value for d in dims))
    return max(sizes)


# a 6 x 4 grid (N = 24 tokens), 2 heads; at the test's budget (401 fp32 elements per block) the
# dense forms (2 x 24 x 24 = 1152 logits) are split into 2-3 blocks each
BLOCKED = {
    "masa_full": (lambda g, B: tuple(torch.randn(B, 2, 6, 4, 8, generator=g) for _ in range(3)),
                  lambda q, k, v: vitattn.masa(q, k, v, 0.9), (0, 1, 2)),
    "masa_decomposed": (lambda g, B: tuple(torch.randn(B, 2, 6, 4, 8, generator=g) for _ in range(3)),
                        lambda q, k, v: vitattn.masa(q, k, v, 0.9, decomposed=True), (0, 1, 2)),
    "group_attention": (lambda g, B: tuple(torch.randn(B, 2, 24, 8, generator=g) for _ in range(3))
                        + (vitattn.random_permutation(24, generator=g),),
                        lambda q, k, v, perm: vitattn.group_attention(q, k, v, 1, perm=perm), (0, 1, 2)),
    "ot_attention": (lambda g, B: (torch.randn(B, 4, 24, 8, generator=g), torch.randn(4, 5, 8, generator=g)),
                     lambda x, ref: vitattn.ot_attention(x, ref, iters=2), (0,)),
}


def test_blocked_export_bounds_every_intermediate(monkeypatch):
    monkeypatch.setenv("VITATTN_DENSE_BUDGET_MB", "0.0046")
    block = dense_elems(torch.float32, 3)
    assert block == 401
    counts, args, _ = _inputs(BLOCKED, 3, B=1)
    module = AllOps(BLOCKED, counts).eval()
    proto = export(module, args)
    got = run(session(proto), args)
    with torch.no_grad():
        want = module(*args)
    for name, a, b in zip(BLOCKED, got, want):
        assert rel_err(a, b) <= TOL, name
    # blocks of whole grid rows (MaSA), of query rows (group attention) or of heads (OT): no
    # intermediate is larger than the budget or than an input / output of the graph
    largest_io = max(t.numel() for t in list(args) + flat(want))
    assert _largest_intermediate(proto) <= max(block, largest_io) < 2 * 24 * 24
    assert sum(n.op_type == "Softmax" for n in proto.graph.node) >= 3 + 3  # MaSA full + group attention blocks


def test_decomposed_masa_never_forms_n_by_n_at_the_default_budget():
    """The decomposed form is two axis passes: (B, heads, H, W, W) logits at most."""
    H = W = 16
    module = AllOps({"m": BLOCKED["masa_decomposed"]}, {"m": 3}).eval()
    g = torch.Generator().manual_seed(4)
    args = [torch.randn(1, 2, H, W, 8, generator=g) for _ in range(3)]
    proto = export(module, args)
    assert _largest_intermediate(proto) <= 2 * H * W * W  # the N x N logits would be 2 * 256 * 256
    (got,) = run(session(proto), args)
    with torch.no_grad():
        (want,) = module(*args)
    assert rel_err(got, want) <= TOL


# ---------------------------------------------------------------- models


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Weights away from their init and non-trivial BatchNorm statistics, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            randomize_batchnorm(m, g)
        jitter_parameters(model, g, 0.05, 0.02)
    return model.eval()


# the smallest configurations that still hold every layer kind of the family
SMALL = {
    # stage 1 decomposed MaSA without layer scale, stage 2 full MaSA with layer scale; patch merging between
    "rmt": (R.VisRetNet, R.RMT, dict(embed_dims=[16, 32], depths=[1, 1], num_heads=[2, 4], init_values=[2, 2],
                                     heads_ranges=[4, 6], mlp_ratios=[2, 2], chunkwise_recurrents=[True, False],
                                     layerscales=[False, True], drop_path_rate=0.0), (1, 3, 48, 40)),
    # stage 1: groups of 4, then the recursive pass in 2 groups of the fixed eval permutation; stage 2: full
    "sret": (S.SReT, S.SReTFeatures, dict(img_size=64, base_dims=(8, 8), depth=(2, 1), recursive_num=(1, 1),
                                          heads=(2, 2), groups1=(4, 1), groups2=(2, 1), mlp_ratio=2.0,
                                          drop_path_rate=0.0), (1, 3, 64, 64)),
    # an 8 x 8 then (after a transition) 4 x 4 token grid
    "dynamixer": (D.DynaMixer, D.DynaMixerFeatures, dict(layers=(1, 1), img_size=56, patch_size=7, embed_dims=(16, 32),
                                                         transitions=(True, False), num_heads=(4, 4),
                                                         reduced_dims=(4, 2), mlp_ratios=(2, 2)), (1, 3, 56, 56)),
    "setformer": (ST.SeTformer, ST.SeTformerFeatures, dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                                           ref_sides=[3, 2], mlp_ratio=2.0, drop_path_rate=0.0,
                                                           layer_scale=0.5, embedding="normalized"), (1, 3, 40, 48)),
}


class ClassifierAndFeatures(nn.Module):
    """A family's classifier and features_only model on one image: one export for both."""

    def __init__(self, classifier, features):
        super().__init__()
        self.classifier, self.features = classifier, features

    def forward(self, x):
        return (self.classifier(x), *self.features(x))


CLASSIFIER_ONLY = {"rmt": dict(projection=24, use_checkpoints=[False, False])}


def small_family(family: str, **kw) -> nn.Module:
    cls, fcls, cfg, _ = SMALL[family]
    cfg = dict(cfg, **kw)
    return ClassifierAndFeatures(randomized(cls(num_classes=5, **cfg, **CLASSIFIER_ONLY.get(family, {})), 1),
                                 randomized(fcls(out_indices=(0, 1), **cfg), 2)).eval()


def check_model(model: nn.Module, x: torch.Tensor, x2=None) -> None:
    proto = export(model, [x])
    standard_ops_only(proto)
    sess = session(proto)
    for inp in (x,) if x2 is None else (x, x2):
        got = run(sess, [inp])
        with torch.no_grad():
            want = flat(model(inp))
        assert len(got) == len(want)
        errs = [rel_err(a, b) for a, b in zip(got, want)]
        assert max(errs) <= TOL, errs


@pytest.mark.parametrize("family", sorted(SMALL))
def test_every_model_family_exports(family):
    torch.manual_seed(0)
    model = small_family(family)
    g = torch.Generator().manual_seed(5)
    shape = SMALL[family][3]
    check_model(model, torch.randn(*shape, generator=g), torch.randn(*shape, generator=g))
    if family == "sret":  # the recursive pass used the fixed eval permutation
        assert any(m.eval_perm is not None for m in model.modules() if isinstance(m, S.GroupAttention))


def test_setformer_nystrom_embedding_exports():
    """The Nystrom embedding's k(Z, Z)^(-1/2) (an eigendecomposition: no ONNX operator) is kept
    in eval mode as a constant of the anchors, so the default SeTformer exports; the cached
    projection follows the anchors (loaded, or changed in place and then run eagerly)."""
    torch.manual_seed(0)
    layer = ST.SeTAttention(16, 2, ref_side=2, embedding="nystrom").eval()
    check_model(layer, torch.randn(1, 4, 5, 16))
    with torch.no_grad():
        layer.embed.anchors.add_(0.05 * torch.randn_like(layer.embed.anchors))
    layer(torch.randn(1, 4, 5, 16))  # an eager eval forward (or eval() again) takes the new anchors
    check_model(layer, torch.randn(1, 4, 5, 16))  # exported again: the new anchors' projection
    cfg = dict(SMALL["setformer"][2], embedding="nystrom")
    model = randomized(ST.SeTformer(**cfg, num_classes=10), 4).eval()
    check_model(model, torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(7)))


def test_full_named_model_rmt_t_at_224():
    torch.manual_seed(0)
    model = randomized(vitattn.models.create_model("rmt_t"), 3)
    check_model(model, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(6)))


# ---------------------------------------------------------------- everything else unchanged


def _op_targets(graph) -> set:
    return {str(n.target) for n in graph.nodes if n.op == "call_function"}


def test_plain_torch_export_keeps_every_custom_op(ops_exported):
    """After an ONNX export in this process (the fixture), torch.export still records each
    op as its vitattn custom op, not the decomposition."""
    counts, args, _ = _inputs(OPS, 0)
    module = AllOps(OPS, counts).eval()
    ep = torch.export.export(module, tuple(args))
    targets = _op_targets(ep.graph)
    for op in ("masa_fwd", "sinkhorn_fwd", "sinkhorn_ot_fwd", "group_attention_fwd", "dynamixer_fwd",
               "depthwise_conv2d_nhwc_fwd"):
        assert f"vitattn.{op}.default" in targets, (op, targets)
    assert not any("softmax" in t for t in targets), targets  # no decomposed attention in the graph
    got = ep.module()(*args)
    with torch.no_grad():
        want = module(*args)
    for a, b in zip(flat(got), flat(want)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_compile_and_eager_keep_the_custom_ops():
    """torch.compile folds the export check to False (no graph break) and calls the custom op;
    eager calls go through the custom op too."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q = torch.randn(1, 2, 4, 5, 8)
    f = torch.compile(lambda q: vitattn.masa(q, q, q, 0.9, decomposed=True), backend=record, fullgraph=True)
    torch.testing.assert_close(f(q), vitattn.masa(q, q, q, 0.9, decomposed=True), atol=0, rtol=0)
    assert len(graphs) == 1
    targets = _op_targets(graphs[0].graph)
    assert targets & {"vitattn.masa_fwd", "vitattn.masa_fwd.default"} and not any("softmax" in t for t in targets)

    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        vitattn.masa(q, q, q, 0.9)
    assert "vitattn.masa_fwd.default" in rec.ops and not any("softmax" in o for o in rec.ops), rec.ops


def test_export_example_script(tmp_path):
    """examples/export_onnx.py (the README's deployment path): exports, runs in onnxruntime and
    checks the outputs against PyTorch, exiting 0 and saying so."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "export_onnx.py")
    out = tmp_path / "rmt_t.onnx"
    proc = subprocess.run([sys.executable, script, "--model", "rmt_t", "--img-size", "64", "96", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert out.exists() and "OK: tolerance" in proc.stdout, proc.stdout[-2000:]
