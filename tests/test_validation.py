"""Validation audit: every rejection of every public function, one table per op.

Rules checked (CONTRIBUTING.md): TypeError for wrong types/dtypes, ValueError for wrong
shapes/values/devices, and the message starts with the function's name and names the
offending argument. Devices are mismatched with "meta" tensors (no GPU here): the
checks must fire before any kernel runs.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

import vitattn
from vitattn import BackendUnavailableError
from vitattn.models import create_model

# the ops' modules
_masa = importlib.import_module("vitattn.ops.masa.op")
_sk = importlib.import_module("vitattn.ops.sinkhorn.op")
_ga = importlib.import_module("vitattn.ops.group_attention.op")
_dm = importlib.import_module("vitattn.ops.dynamixer.op")

F32, F64 = torch.float32, torch.float64
META = torch.device("meta")


def rnd(*shape, dtype=F32, device="cpu"):
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device=META)
    return torch.randn(*shape, dtype=dtype)


def check(fn, args, kwargs, exc, prefix, arg):
    """fn(*args, **kwargs) raises exactly `exc` whose message starts with `prefix:` and names `arg`."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    err = info.value
    # exact class: a BackendUnavailableError (RuntimeError) or AttributeError is not a validation error
    assert type(err) is exc, f"expected {exc.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    assert msg.startswith(f"{prefix}:"), f"message does not start with {prefix!r}: {msg}"
    assert re.search(rf"\b{re.escape(arg)}\b", msg), f"message does not name {arg!r}: {msg}"


def _ids(table):
    return [c[0] for c in table]


# ---------------------------------------------------------------- masa

def _masa_args():
    return dict(q=rnd(1, 2, 3, 4, 8), k=rnd(1, 2, 3, 4, 8), v=rnd(1, 2, 3, 4, 6), gamma=0.9)


# (id, changes to the valid arguments, exception, argument named)
MASA = [
    ("q-not-tensor", dict(q=[[1.0]]), TypeError, "q"),
    ("k-none", dict(k=None), TypeError, "k"),
    ("v-numpy", dict(v=rnd(1, 2, 3, 4, 6).numpy()), TypeError, "v"),
    ("q-4d", dict(q=rnd(2, 3, 4, 8)), ValueError, "q"),
    ("k-6d", dict(k=rnd(1, 1, 2, 3, 4, 8)), ValueError, "k"),
    ("v-4d", dict(v=rnd(2, 3, 4, 6)), ValueError, "v"),
    ("q-int", dict(q=torch.ones(1, 2, 3, 4, 8, dtype=torch.int32), k=torch.ones(1, 2, 3, 4, 8, dtype=torch.int32),
                   v=torch.ones(1, 2, 3, 4, 6, dtype=torch.int32)), TypeError, "q"),
    ("k-dtype", dict(k=rnd(1, 2, 3, 4, 8, dtype=F64)), TypeError, "k"),
    ("v-dtype", dict(v=rnd(1, 2, 3, 4, 6, dtype=torch.float16)), TypeError, "v"),
    ("k-shape", dict(k=rnd(1, 2, 3, 4, 7)), ValueError, "k"),
    ("v-shape", dict(v=rnd(1, 2, 3, 5, 6)), ValueError, "v"),
    ("k-device", dict(k=rnd(1, 2, 3, 4, 8, device="meta")), ValueError, "k"),
    ("v-device", dict(v=rnd(1, 2, 3, 4, 6, device="meta")), ValueError, "v"),
    ("q-no-features", dict(q=rnd(1, 2, 3, 4, 0), k=rnd(1, 2, 3, 4, 0)), ValueError, "q"),
    ("gamma-zero", dict(gamma=0.0), ValueError, "gamma"),
    ("gamma-above-one", dict(gamma=1.5), ValueError, "gamma"),
    ("gamma-negative", dict(gamma=-0.5), ValueError, "gamma"),
    ("gamma-nan", dict(gamma=float("nan")), ValueError, "gamma"),
    ("gamma-str", dict(gamma="0.9"), TypeError, "gamma"),
    ("gamma-bool", dict(gamma=True), TypeError, "gamma"),
    ("gamma-none", dict(gamma=None), TypeError, "gamma"),
    ("gamma-int-tensor", dict(gamma=torch.ones(2, dtype=torch.int64)), TypeError, "gamma"),
    ("gamma-shape", dict(gamma=torch.full((3,), 0.9)), ValueError, "gamma"),
    ("gamma-2d", dict(gamma=torch.full((2, 1), 0.9)), ValueError, "gamma"),
    ("gamma-device", dict(gamma=torch.empty(2, device=META)), ValueError, "gamma"),
    ("gamma-tensor-value", dict(gamma=torch.tensor([0.5, 0.0])), ValueError, "gamma"),
    ("gamma-tensor-nan", dict(gamma=torch.tensor([0.5, float("nan")])), ValueError, "gamma"),
    ("decomposed-int", dict(decomposed=1), TypeError, "decomposed"),
    ("scale-str", dict(scale="1"), TypeError, "scale"),
    ("scale-inf", dict(scale=float("inf")), ValueError, "scale"),
    ("scale-nan", dict(scale=float("nan")), ValueError, "scale"),
    ("backend-int", dict(backend=1), TypeError, "backend"),
    ("backend-unknown", dict(backend="fast"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", MASA, ids=_ids(MASA))
def test_masa_rejects(case):
    _, change, exc, arg = case
    a = {**_masa_args(), **change}
    q, k, v, gamma = a.pop("q"), a.pop("k"), a.pop("v"), a.pop("gamma")
    check(vitattn.masa, (q, k, v, gamma), a, exc, "masa", arg)


def test_masa_accepts_the_valid_call():
    # the table's base call itself must pass, or every row above proves nothing
    a = _masa_args()
    out = vitattn.masa(a["q"], a["k"], a["v"], a["gamma"], backend="torch")
    assert out.shape == (1, 2, 3, 4, 6)
    vitattn.masa(a["q"], a["k"], a["v"], torch.tensor([0.5, 1.0]), decomposed=True, scale=0.3, backend="torch")


# ---------------------------------------------------------------- sinkhorn

SINKHORN = [
    ("scores-not-tensor", dict(scores=[[1.0, 2.0]]), TypeError, "scores"),
    ("scores-1d", dict(scores=rnd(5)), ValueError, "scores"),
    ("scores-int", dict(scores=torch.ones(2, 5, 4, dtype=torch.int64)), TypeError, "scores"),
    ("scores-empty", dict(scores=rnd(2, 0, 4)), ValueError, "scores"),
    ("eps-zero", dict(eps=0.0), ValueError, "eps"),
    ("eps-negative", dict(eps=-0.1), ValueError, "eps"),
    ("eps-nan", dict(eps=float("nan")), ValueError, "eps"),
    ("eps-inf", dict(eps=float("inf")), ValueError, "eps"),
    ("eps-str", dict(eps="0.1"), TypeError, "eps"),
    ("eps-bool", dict(eps=True), TypeError, "eps"),
    ("iters-zero", dict(iters=0), ValueError, "iters"),
    ("iters-float", dict(iters=2.0), TypeError, "iters"),
    ("iters-bool", dict(iters=True), TypeError, "iters"),
    ("a-list", dict(a=[0.2] * 5), TypeError, "a"),
    ("a-int", dict(a=torch.ones(5, dtype=torch.int64)), TypeError, "a"),
    ("a-shape", dict(a=torch.full((6,), 0.2)), ValueError, "a"),
    ("a-batch-shape", dict(a=torch.full((3, 5), 0.2)), ValueError, "a"),
    ("a-zero-mass", dict(a=torch.tensor([0.2, 0.2, 0.0, 0.3, 0.3])), ValueError, "a"),
    ("a-negative", dict(a=torch.tensor([0.2, 0.2, -0.1, 0.4, 0.3])), ValueError, "a"),
    ("a-nan", dict(a=torch.tensor([0.2, 0.2, float("nan"), 0.3, 0.3])), ValueError, "a"),
    ("a-device", dict(a=torch.empty(5, device=META)), ValueError, "a"),
    ("b-shape", dict(b=torch.full((5,), 0.25)), ValueError, "b"),
    ("b-inf", dict(b=torch.tensor([0.25, float("inf"), 0.25, 0.25])), ValueError, "b"),
    ("b-int", dict(b=torch.ones(4, dtype=torch.int32)), TypeError, "b"),
    ("b-scalar", dict(b=torch.tensor(0.25)), ValueError, "b"),
    ("backend-none", dict(backend=None), TypeError, "backend"),
    ("backend-unknown", dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", SINKHORN, ids=_ids(SINKHORN))
def test_sinkhorn_rejects(case):
    _, change, exc, arg = case
    a = {"scores": rnd(2, 5, 4), **change}
    check(_sk.sinkhorn, (a.pop("scores"),), a, exc, "sinkhorn", arg)


def test_sinkhorn_accepts_the_valid_call():
    _sk.sinkhorn(rnd(2, 5, 4), a=torch.full((5,), 0.2), b=torch.full((2, 4), 0.25), backend="torch")


# ---------------------------------------------------------------- ot_aggregate / ot_attention

def _ot_args():
    return dict(x=rnd(2, 2, 5, 4), ref=rnd(2, 3, 4), v=rnd(2, 2, 5, 6))


OT = [
    ("x-not-tensor", dict(x=1.0), TypeError, "x"),
    ("x-3d", dict(x=rnd(2, 5, 4)), ValueError, "x"),
    ("x-int", dict(x=torch.ones(2, 2, 5, 4, dtype=torch.int64)), TypeError, "x"),
    ("x-empty", dict(x=rnd(2, 2, 0, 4), v=rnd(2, 2, 0, 6)), ValueError, "x"),
    ("ref-not-tensor", dict(ref=[[1.0]]), TypeError, "ref"),
    ("ref-4d", dict(ref=rnd(1, 2, 3, 4)), ValueError, "ref"),
    ("ref-dtype", dict(ref=rnd(2, 3, 4, dtype=F64)), TypeError, "ref"),
    ("ref-device", dict(ref=rnd(2, 3, 4, device="meta")), ValueError, "ref"),
    ("ref-heads", dict(ref=rnd(3, 3, 4)), ValueError, "ref"),
    ("ref-dim", dict(ref=rnd(2, 3, 5)), ValueError, "ref"),
    ("ref-empty", dict(ref=rnd(2, 0, 4)), ValueError, "ref"),
    ("v-not-tensor", dict(v=[1.0, 2.0]), TypeError, "v"),
    ("v-3d", dict(v=rnd(2, 2, 5)), ValueError, "v"),
    ("v-5d", dict(v=rnd(2, 2, 5, 6, 1)), ValueError, "v"),
    ("v-dtype", dict(v=rnd(2, 2, 5, 6, dtype=F64)), TypeError, "v"),
    ("v-device", dict(v=rnd(2, 2, 5, 6, device="meta")), ValueError, "v"),
    ("v-tokens", dict(v=rnd(2, 2, 4, 6)), ValueError, "v"),
    ("x-no-features", dict(x=rnd(2, 2, 5, 0), ref=rnd(2, 3, 0), v=None), ValueError, "x"),
    ("eps-zero", dict(eps=0), ValueError, "eps"),
    ("eps-list", dict(eps=[0.1]), TypeError, "eps"),
    ("iters-negative", dict(iters=-1), ValueError, "iters"),
    ("iters-float", dict(iters=3.5), TypeError, "iters"),
    ("pos_filter-list", dict(pos_filter=[[1.0]]), TypeError, "pos_filter"),
    ("pos_filter-1d", dict(pos_filter=torch.ones(15)), ValueError, "pos_filter"),
    ("pos_filter-int", dict(pos_filter=torch.ones(5, 3, dtype=torch.int64)), TypeError, "pos_filter"),
    ("pos_filter-shape", dict(pos_filter=torch.ones(3, 5)), ValueError, "pos_filter"),
    ("pos_filter-device", dict(pos_filter=torch.empty(5, 3, device=META)), ValueError, "pos_filter"),
    ("pos_filter-requires-grad", dict(pos_filter=torch.ones(5, 3, requires_grad=True)), ValueError, "pos_filter"),
    ("backend-bytes", dict(backend=b"torch"), TypeError, "backend"),
    ("backend-unknown", dict(backend="flash"), ValueError, "backend"),
]

OT_FNS = {"ot_aggregate": _sk.ot_aggregate, "ot_attention": _sk.ot_attention}


@pytest.mark.parametrize("fn_name", sorted(OT_FNS))
@pytest.mark.parametrize("case", OT, ids=_ids(OT))
def test_ot_rejects(fn_name, case):
    _, change, exc, arg = case
    a = {**_ot_args(), **change}
    x, ref = a.pop("x"), a.pop("ref")
    # every message names the public function the user called (the module's shared dispatcher
    # is named "sinkhorn", which must not leak into ot_* errors)
    check(OT_FNS[fn_name], (x, ref), a, exc, fn_name, arg)


@pytest.mark.parametrize("fn_name", sorted(OT_FNS))
def test_ot_accepts_the_valid_call(fn_name):
    a = _ot_args()
    OT_FNS[fn_name](a["x"], a["ref"], a["v"], pos_filter=torch.rand(5, 3), backend="torch")
    OT_FNS[fn_name](a["x"], a["ref"], backend="torch")


# ---------------------------------------------------------------- group attention

def _ga_args():
    return dict(q=rnd(1, 2, 6, 4), k=rnd(1, 2, 6, 4), v=rnd(1, 2, 6, 5), groups=2)


GA = [
    ("q-not-tensor", dict(q="q"), TypeError, "q"),
    ("k-5d", dict(k=rnd(1, 1, 2, 6, 4)), ValueError, "k"),
    ("v-3d", dict(v=rnd(2, 6, 5)), ValueError, "v"),
    ("q-int", dict(q=torch.ones(1, 2, 6, 4, dtype=torch.int16)), TypeError, "q"),
    ("k-dtype", dict(k=rnd(1, 2, 6, 4, dtype=F64)), TypeError, "k"),
    ("v-dtype", dict(v=rnd(1, 2, 6, 5, dtype=torch.bfloat16)), TypeError, "v"),
    ("k-device", dict(k=rnd(1, 2, 6, 4, device="meta")), ValueError, "k"),
    ("v-device", dict(v=rnd(1, 2, 6, 5, device="meta")), ValueError, "v"),
    ("k-shape", dict(k=rnd(1, 2, 6, 3)), ValueError, "k"),
    ("v-shape", dict(v=rnd(1, 2, 4, 5)), ValueError, "v"),
    ("q-empty", dict(q=rnd(1, 2, 6, 0), k=rnd(1, 2, 6, 0)), ValueError, "q"),
    ("groups-zero", dict(groups=0), ValueError, "groups"),
    ("groups-not-divisor", dict(groups=4), ValueError, "groups"),
    ("groups-float", dict(groups=2.0), TypeError, "groups"),
    ("groups-bool", dict(groups=True), TypeError, "groups"),
    ("perm-list", dict(perm=[0, 1, 2, 3, 4, 5]), TypeError, "perm"),
    ("perm-int32", dict(perm=torch.arange(6, dtype=torch.int32)), TypeError, "perm"),
    ("perm-float", dict(perm=torch.arange(6.0)), TypeError, "perm"),
    ("perm-length", dict(perm=torch.arange(5)), ValueError, "perm"),
    ("perm-2d", dict(perm=torch.arange(6).reshape(2, 3)), ValueError, "perm"),
    ("perm-device", dict(perm=torch.empty(6, dtype=torch.int64, device=META)), ValueError, "perm"),
    ("perm-duplicate", dict(perm=torch.tensor([0, 1, 2, 2, 4, 5])), ValueError, "perm"),
    ("perm-out-of-range", dict(perm=torch.tensor([0, 1, 2, 3, 4, 6])), ValueError, "perm"),
    ("perm-negative", dict(perm=torch.tensor([0, 1, 2, 3, 4, -1])), ValueError, "perm"),
    # groups=1 ignores the permutation's order but must still validate it
    ("perm-duplicate-groups1", dict(groups=1, perm=torch.tensor([0, 0, 2, 3, 4, 5])), ValueError, "perm"),
    ("scale-str", dict(scale="x"), TypeError, "scale"),
    ("scale-inf", dict(scale=float("-inf")), ValueError, "scale"),
    ("backend-int", dict(backend=0), TypeError, "backend"),
    ("backend-unknown", dict(backend="flash"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", GA, ids=_ids(GA))
def test_group_attention_rejects(case):
    _, change, exc, arg = case
    a = {**_ga_args(), **change}
    q, k, v, groups = a.pop("q"), a.pop("k"), a.pop("v"), a.pop("groups")
    check(_ga.group_attention, (q, k, v, groups), a, exc, "group_attention", arg)


def test_group_attention_accepts_the_valid_call():
    a = _ga_args()
    _ga.group_attention(a["q"], a["k"], a["v"], 3, perm=torch.randperm(6), scale=0.5, backend="torch")


RANDPERM = [
    ("n-zero", dict(n=0), ValueError, "n"),
    ("n-negative", dict(n=-3), ValueError, "n"),
    ("n-float", dict(n=4.0), TypeError, "n"),
    ("n-bool", dict(n=True), TypeError, "n"),
    ("n-tensor", dict(n=torch.tensor(4)), TypeError, "n"),
    ("device-bad", dict(device="nonsense"), ValueError, "device"),
    ("generator-seed", dict(generator=0), TypeError, "generator"),
    ("generator-device", dict(device="meta", generator=torch.Generator()), ValueError, "generator"),
]


@pytest.mark.parametrize("case", RANDPERM, ids=_ids(RANDPERM))
def test_random_permutation_rejects(case):
    _, change, exc, arg = case
    a = {"n": 5, **change}
    check(_ga.random_permutation, (a.pop("n"),), a, exc, "random_permutation", arg)


INVPERM = [
    ("perm-list", [2, 0, 1], TypeError),
    ("perm-int32", torch.tensor([2, 0, 1], dtype=torch.int32), TypeError),
    ("perm-float", torch.tensor([2.0, 0.0, 1.0]), TypeError),
    ("perm-2d", torch.tensor([[1, 0], [0, 1]]), ValueError),
    ("perm-0d", torch.tensor(0), ValueError),
    ("perm-duplicate", torch.tensor([1, 1, 0]), ValueError),
    ("perm-out-of-range", torch.tensor([0, 1, 3]), ValueError),
]


@pytest.mark.parametrize("case", INVPERM, ids=_ids(INVPERM))
def test_inverse_permutation_rejects(case):
    _, perm, exc = case
    check(_ga.inverse_permutation, (perm,), {}, exc, "inverse_permutation", "perm")


def test_permutation_helpers_accept_valid_calls():
    g = torch.Generator().manual_seed(0)
    p = _ga.random_permutation(7, generator=g)
    assert torch.equal(torch.sort(p).values, torch.arange(7))
    assert torch.equal(p[_ga.inverse_permutation(p)], torch.arange(7))


# ---------------------------------------------------------------- dynamixer

def _dm_args():
    # x (B, L=5, C=6), segments 2, d 2
    return dict(x=rnd(2, 5, 6), compress_weight=rnd(4, 6), compress_bias=rnd(4), generate_weight=rnd(25, 10),
                generate_bias=rnd(25), segments=2)


DM = [
    ("x-not-tensor", dict(x=3), TypeError, "x"),
    ("x-1d", dict(x=rnd(6)), ValueError, "x"),
    ("x-int", dict(x=torch.ones(2, 5, 6, dtype=torch.int64)), TypeError, "x"),
    ("x-no-tokens", dict(x=rnd(2, 0, 6)), ValueError, "x"),
    ("segments-zero", dict(segments=0), ValueError, "segments"),
    ("segments-not-divisor", dict(segments=4), ValueError, "segments"),
    ("segments-float", dict(segments=2.0), TypeError, "segments"),
    ("segments-bool", dict(segments=True), TypeError, "segments"),
    ("compress_weight-none", dict(compress_weight=None), TypeError, "compress_weight"),
    ("compress_weight-3d", dict(compress_weight=rnd(1, 4, 6)), ValueError, "compress_weight"),
    ("compress_weight-in", dict(compress_weight=rnd(4, 5)), ValueError, "compress_weight"),
    ("compress_weight-out", dict(compress_weight=rnd(3, 6)), ValueError, "compress_weight"),
    ("compress_weight-dtype", dict(compress_weight=rnd(4, 6, dtype=F64)), TypeError, "compress_weight"),
    ("compress_weight-device", dict(compress_weight=rnd(4, 6, device="meta")), ValueError, "compress_weight"),
    ("compress_bias-list", dict(compress_bias=[0.0] * 4), TypeError, "compress_bias"),
    ("compress_bias-shape", dict(compress_bias=rnd(5)), ValueError, "compress_bias"),
    ("compress_bias-2d", dict(compress_bias=rnd(1, 4)), ValueError, "compress_bias"),
    ("compress_bias-dtype", dict(compress_bias=rnd(4, dtype=torch.float16)), TypeError, "compress_bias"),
    ("generate_weight-shape", dict(generate_weight=rnd(25, 12)), ValueError, "generate_weight"),
    ("generate_weight-1d", dict(generate_weight=rnd(250)), ValueError, "generate_weight"),
    ("generate_weight-dtype", dict(generate_weight=rnd(25, 10, dtype=F64)), TypeError, "generate_weight"),
    ("generate_weight-device", dict(generate_weight=rnd(25, 10, device="meta")), ValueError, "generate_weight"),
    ("generate_bias-shape", dict(generate_bias=rnd(24)), ValueError, "generate_bias"),
    ("generate_bias-device", dict(generate_bias=rnd(25, device="meta")), ValueError, "generate_bias"),
    ("generate_bias-int", dict(generate_bias=torch.ones(25, dtype=torch.int64)), TypeError, "generate_bias"),
    ("backend-int", dict(backend=2), TypeError, "backend"),
    ("backend-unknown", dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", DM, ids=_ids(DM))
def test_dynamixer_rejects(case):
    _, change, exc, arg = case
    a = {**_dm_args(), **change}
    pos = [a.pop(n) for n in ("x", "compress_weight", "compress_bias", "generate_weight", "generate_bias",
                               "segments")]
    check(_dm.dynamixer, pos, a, exc, "dynamixer", arg)


def test_dynamixer_accepts_the_valid_call():
    a = _dm_args()
    _dm.dynamixer(*a.values(), backend="torch")
    _dm.dynamixer(a["x"], a["compress_weight"], None, a["generate_weight"], None, 2, backend="torch")


# ---------------------------------------------------------------- position filter helpers

FILTERS = [
    ("gaussian_filter_1d", "n-zero", dict(n=0), ValueError, "n"),
    ("gaussian_filter_1d", "m-str", dict(m="3"), TypeError, "m"),
    ("gaussian_filter_1d", "m-float", dict(m=3.0), TypeError, "m"),
    ("gaussian_filter_1d", "sigma-zero", dict(sigma=0.0), ValueError, "sigma"),
    ("gaussian_filter_1d", "sigma-nan", dict(sigma=float("nan")), ValueError, "sigma"),
    ("gaussian_filter_1d", "sigma-none", dict(sigma=None), TypeError, "sigma"),
    ("gaussian_filter_2d", "height-zero", dict(height=0), ValueError, "height"),
    ("gaussian_filter_2d", "width-float", dict(width=4.5), TypeError, "width"),
    ("gaussian_filter_2d", "m-not-square", dict(m=8), ValueError, "m"),
    ("gaussian_filter_2d", "m-negative", dict(m=-4), ValueError, "m"),
    ("gaussian_filter_2d", "sigma-negative", dict(sigma=-1.0), ValueError, "sigma"),
    ("gaussian_filter_2d", "sigma-str", dict(sigma="0.1"), TypeError, "sigma"),
]


@pytest.mark.parametrize("case", FILTERS, ids=[f"{c[0]}-{c[1]}" for c in FILTERS])
def test_filter_helpers_reject(case):
    fn_name, _, change, exc, arg = case
    base = dict(n=5, m=4) if fn_name == "gaussian_filter_1d" else dict(height=3, width=4, m=4)
    a = {**base, **change}
    fn = getattr(_sk, fn_name)
    pos = [a.pop(k) for k in list(base)]
    check(fn, pos, a, exc, fn_name, arg)


def test_filter_helpers_accept_valid_calls():
    assert _sk.gaussian_filter_1d(5, 4, sigma=0.5).shape == (5, 4)
    assert _sk.gaussian_filter_2d(3, 4, 4, sigma=0.5, dtype=F64).shape == (12, 4)


# ---------------------------------------------------------------- create_model

MODELS = [
    ("name-int", (3,), {}, TypeError, "name"),
    ("name-none", (None,), {}, TypeError, "name"),
    ("name-unknown", ("rmt_xxl",), {}, ValueError, "model"),
]
# every model family rejects a bad attn_backend and a bad pretrained before building anything
for _m in ("rmt_t", "sret_t", "dynamixer_s", "setformer_mini"):
    MODELS += [
        (f"{_m}-attn_backend-unknown", (_m,), dict(attn_backend="fast"), ValueError, "attn_backend"),
        (f"{_m}-attn_backend-int", (_m,), dict(attn_backend=1), TypeError, "attn_backend"),
        (f"{_m}-pretrained-true", (_m,), dict(pretrained=True), ValueError, "pretrained"),
        (f"{_m}-pretrained-int", (_m,), dict(pretrained=3), TypeError, "pretrained"),
        (f"{_m}-pretrained-missing", (_m,), dict(pretrained="/nonexistent/ckpt.pth"), ValueError, "pretrained"),
    ]


@pytest.mark.parametrize("case", MODELS, ids=_ids(MODELS))
def test_create_model_rejects(case):
    _id, args, kwargs, exc, arg = case
    with pytest.raises(Exception) as info:
        create_model(*args, **kwargs)
    err = info.value
    assert type(err) is exc, f"expected {exc.__name__}, got {type(err).__name__}: {err}"
    # constructor errors carry the model (or class) name rather than "create_model"
    assert re.search(rf"\b{re.escape(arg)}\b", str(err)), f"message does not name {arg!r}: {err}"


def test_create_model_rejects_unknown_keyword():
    with pytest.raises(TypeError, match="not_an_option"):
        create_model("dynamixer_s", not_an_option=1)


# ---------------------------------------------------------------- backends that cannot run

def test_unavailable_backend_names_the_reason():
    # "cuda" is a MaSA backend name, never runnable without a GPU: a RuntimeError subclass with a reason
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda backend may run")
    a = _masa_args()
    with pytest.raises(BackendUnavailableError, match="masa: backend 'cuda' cannot run"):
        vitattn.masa(a["q"], a["k"], a["v"], 0.9, backend="cuda")
