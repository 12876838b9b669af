"""vitattn.nn.linear: the models' linear layer, F.linear with the GEMM chosen per machine."""

import pytest
import torch
import torch.nn.functional as F

from vitattn import _env
from vitattn.nn import Linear, cpu_linear_choice, linear
from vitattn.nn import _linear as linear_module

ONEDNN_MISSING = linear_module._onednn_missing()
needs_onednn = pytest.mark.skipif(ONEDNN_MISSING is not None, reason=str(ONEDNN_MISSING))


def _rand(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _node_name(t):
    """The autograd node that made t, looking through reshapes."""
    node = t.grad_fn
    while node is not None and type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        node = node.next_functions[0][0]
    return type(node).__name__ if node is not None else None


def _values_and_grads(x, w, b):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    out = linear(x, w, b)
    dy = _rand(*out.shape, seed=99)
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], dy)
    return out, grads


@needs_onednn
@pytest.mark.parametrize("case", ["3d", "strided", "no_bias", "2d_odd"])
def test_onednn_path_matches_f_linear_values_and_gradients(case, monkeypatch):
    monkeypatch.setenv("VITATTN_CPU_LINEAR", "onednn")
    if case == "3d":
        x, w, b = _rand(5, 37, 64, seed=1), _rand(96, 64, seed=2), _rand(96, seed=3)
    elif case == "strided":  # a transposed view: (B, N, C) read through (B, C, N) storage
        x, w, b = _rand(3, 72, 211, seed=4).transpose(1, 2), _rand(130, 72, seed=5), _rand(130, seed=6)
    elif case == "no_bias":
        x, w, b = _rand(2, 9, 7, 48, seed=7), _rand(200, 48, seed=8), None
    else:
        x, w, b = _rand(1031, 33, seed=9), _rand(65, 33, seed=10), _rand(65, seed=11)
    assert x.numel() * w.shape[0] >= linear_module.MIN_MACS
    out, grads = _values_and_grads(x, w, b)
    x_, w_ = x.detach().requires_grad_(), w.detach().requires_grad_()
    b_ = b.detach().requires_grad_() if b is not None else None
    want = F.linear(x_.double(), w_.double(), b_.double() if b_ is not None else None)
    want_grads = torch.autograd.grad(want, [t for t in (x_, w_, b_) if t is not None], _rand(*want.shape, seed=99).double())
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    for g, gw in zip(grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), gw.double(), atol=5e-5, rtol=5e-5)
    # the oneDNN path really ran: its own autograd node, and F.linear would give other bits
    x2 = x.detach().requires_grad_()
    assert _node_name(linear(x2, w, b)) == "_OneDNNLinearBackward"


@needs_onednn
def test_onednn_path_without_gradients_makes_no_graph(monkeypatch):
    monkeypatch.setenv("VITATTN_CPU_LINEAR", "onednn")
    x, w, b = _rand(64, 128, seed=1), _rand(256, 128, seed=2), _rand(256, seed=3)
    with torch.no_grad():
        wp = torch.nn.Parameter(w)
        out = linear(x, wp, b)
    assert out.grad_fn is None
    torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("setting", ["onednn", "aten", "auto"])
def test_ineligible_calls_run_f_linear(setting, monkeypatch):
    if setting == "onednn" and ONEDNN_MISSING:
        pytest.skip(ONEDNN_MISSING)
    monkeypatch.setenv("VITATTN_CPU_LINEAR", setting)
    w = _rand(96, 64, seed=2).requires_grad_()
    small = _rand(4, 64, seed=1)  # 4 * 64 * 96 multiply-adds: below MIN_MACS
    assert _node_name(linear(small, w)) == "MmBackward0"
    x64 = _rand(300, 64, seed=3, dtype=torch.float64)  # fp64: F.linear (and so the fp64 gradchecks)
    assert _node_name(linear(x64, w.double())) != "_OneDNNLinearBackward"
    big = _rand(300, 64, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own rules apply
        out = linear(big, w)
    assert out.dtype == torch.bfloat16 and _node_name(out) != "_OneDNNLinearBackward"
    if setting == "aten":
        assert _node_name(linear(big, w)) != "_OneDNNLinearBackward"


@needs_onednn
def test_traces_and_modes_see_an_ordinary_linear(monkeypatch):
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setenv("VITATTN_CPU_LINEAR", "onednn")
    w, b = _rand(96, 64, seed=2), _rand(96, seed=3)
    x = _rand(300, 64, seed=1)
    gm = make_fx(lambda t: linear(t, w, b))(x)
    assert "mkldnn" not in gm.code and ("addmm" in gm.code or "linear" in gm.code), gm.code
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: linear(t, w, b), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_choice_follows_the_variable_and_says_why(monkeypatch):
    monkeypatch.setenv("VITATTN_CPU_LINEAR", "aten")
    assert cpu_linear_choice() == ("aten", "VITATTN_CPU_LINEAR=aten")
    monkeypatch.setenv("VITATTN_CPU_LINEAR", "auto")
    name, why = cpu_linear_choice()
    assert name in ("aten", "onednn") and why
    monkeypatch.setenv("VITATTN_CPU_LINEAR", "mkl")
    with pytest.raises(ValueError, match="VITATTN_CPU_LINEAR"):
        cpu_linear_choice()
    monkeypatch.setenv("VITATTN_CPU_LINEAR", "onednn")
    monkeypatch.setattr(linear_module, "_onednn_missing", lambda: "no oneDNN in this build (test)")
    with pytest.raises(RuntimeError, match="VITATTN_CPU_LINEAR=onednn cannot run: no oneDNN"):
        cpu_linear_choice()


def test_linear_module_is_an_nn_linear_with_the_same_state():
    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 80)
    torch.manual_seed(0)
    mod = Linear(64, 80)
    assert isinstance(mod, torch.nn.Linear)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    for k in ref.state_dict():
        assert torch.equal(mod.state_dict()[k], ref.state_dict()[k])
    x = _rand(7, 300, 64, seed=5)
    torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-5)
    assert "VITATTN_CPU_LINEAR" in _env.VARIABLES and "VITATTN_CPU_LINEAR" in _env.__doc__
