"""vitattn.nn.Mlp and gelu_fresh: the in-place GELU the models apply to fc1's output where no
backward is recorded, and the out-of-place one everywhere else."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitattn.nn import Mlp
from vitattn.nn.mlp import activation, gelu_fresh


def test_gelu_fresh_is_exact_gelu_in_place_only_without_a_backward():
    h = torch.randn(4, 7, 33)
    want = F.gelu(h)
    with torch.no_grad():
        buf = h.clone()
        out = gelu_fresh(buf)
        assert out.data_ptr() == buf.data_ptr() and torch.equal(out, want)
    with torch.inference_mode():
        buf = h.clone()
        assert gelu_fresh(buf).data_ptr() == buf.data_ptr()
    # a backward is recorded: out of place, the input intact, the gradient exact
    leaf = h.clone().requires_grad_()
    out = gelu_fresh(leaf * 1.0)
    assert torch.equal(out, want)
    (g,) = torch.autograd.grad(out.sum(), [leaf])
    (g_want,) = torch.autograd.grad(F.gelu(leaf).sum(), [leaf])
    assert torch.equal(g, g_want)


def test_traced_graphs_keep_the_out_of_place_gelu():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(h):
        return gelu_fresh(h * 2.0)

    with torch.no_grad():
        graph = make_fx(f)(torch.randn(3, 5)).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert "aten.gelu.default" in targets and "aten.gelu_.default" not in targets, targets
    torch._dynamo.reset()
    x = torch.randn(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), F.gelu(x * 2.0))


def test_activation_calls_other_modules_and_hooked_gelu_as_modules():
    h = torch.randn(2, 9)
    seen = []
    for act in (nn.ReLU(), nn.GELU(approximate="tanh"), nn.SiLU()):
        with torch.no_grad():
            torch.testing.assert_close(activation(act, h.clone()), act(h), atol=0, rtol=0)
    hooked = nn.GELU()
    hooked.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        buf = h.clone()
        out = activation(hooked, buf)
    assert seen and out.data_ptr() != buf.data_ptr() and torch.equal(buf, h)


def test_mlp_matches_the_plain_composition_in_inference_and_training():
    torch.manual_seed(0)
    mlp = Mlp(12, 30, drop=0.0)
    x = torch.randn(3, 5, 12, requires_grad=True)
    plain = lambda x: mlp.fc2(F.gelu(mlp.fc1(x)))
    with torch.no_grad():
        assert torch.equal(mlp(x), plain(x))
    out = mlp(x)
    assert torch.equal(out, plain(x))
    grads = torch.autograd.grad(out.sum(), [x, mlp.fc1.weight])
    grads_want = torch.autograd.grad(plain(x).sum(), [x, mlp.fc1.weight])
    for a, b in zip(grads, grads_want):
        assert torch.equal(a, b)
    assert set(mlp.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
