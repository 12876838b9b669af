"""What every op shares: explain(), VITATTN_BACKEND, empty inputs, sync-free value checks on
(fake) CUDA tensors, cheap start-up, the package layout."""

import ast
import glob
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vitattn
from vitattn import _env, _validate as V

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def calls(device="cpu", dtype=torch.float32, B=2, seed=0):
    """One call per op: (name, args, kwargs, differentiable inputs)."""
    g = _gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)
    q, k, v = r(B, 2, 3, 4, 8), r(B, 2, 3, 4, 8), r(B, 2, 3, 4, 6)
    gq, gk, gv = r(B, 2, 12, 8), r(B, 2, 12, 8), r(B, 2, 12, 5)
    x, ref, xv = r(B, 2, 9, 4), r(2, 3, 4), r(B, 2, 9, 5)
    S = r(B, 5, 7)
    xd = r(B, 6, 8)
    wc, bc, wg, bg = r(4, 8), r(4), r(36, 12), r(36)
    xc, wdc, bdc = r(B, 5, 6, 7), r(7, 1, 3, 3), r(7)
    return [
        ("masa", (q, k, v, 0.8), {}, (q, k, v)),
        ("masa", (q, k, v, 0.8), {"decomposed": True}, (q, k, v)),
        ("sinkhorn", (S,), {}, (S,)),
        ("ot_aggregate", (x, ref, xv), {}, (x, ref, xv)),
        ("ot_attention", (x, ref, xv), {}, (x, ref, xv)),
        ("group_attention", (gq, gk, gv, 3), {"perm": vitattn.random_permutation(12, device=device)}, (gq, gk, gv)),
        ("dynamixer", (xd, wc, bc, wg, bg, 2), {}, (xd, wc, bc, wg, bg)),
        ("depthwise_conv2d_nhwc", (xc, wdc, bdc, 1), {}, (xc, wdc, bdc)),
    ]


# ---------------------------------------------------------------- explain


@pytest.mark.parametrize("i", range(8))
def test_explain_takes_the_ops_own_arguments(i):
    name, args, kwargs, _ = calls()[i]
    ex = vitattn.explain(name, *args, **kwargs)
    rows = list(ex)
    assert rows and all(len(r) == 3 for r in rows)
    assert ex.chosen == next(r.backend for r in rows if r.can_run)
    assert "torch" in {r.backend for r in rows if r.can_run}
    text = str(ex)
    assert name in text and "torch" in text and "<- auto" in text
    # the op itself runs on the backend explain says "auto" takes
    getattr(vitattn, name)(*args, **kwargs, backend=ex.chosen)
    assert set(ex.reasons()) == {r.backend for r in rows}


def test_explain_rejects_unknown_ops_and_bad_arguments():
    with pytest.raises(ValueError, match="op must be one of"):
        vitattn.explain("flash", 1)
    with pytest.raises(TypeError, match="op must be a string"):
        vitattn.explain(3)
    q = torch.randn(1, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="gamma"):
        vitattn.explain("masa", q, q, q, 1.5)


def test_backends_lists_every_accepted_name():
    assert vitattn.backends("masa") == ("auto", "cuda", "triton", "cpu", "torch")
    for op in ("sinkhorn", "ot_aggregate", "ot_attention", "group_attention", "dynamixer"):
        names = vitattn.backends(op)
        assert names[0] == "auto" and "torch" in names and "triton" in names


# ---------------------------------------------------------------- VITATTN_BACKEND


def _override(monkeypatch, value):
    monkeypatch.setenv("VITATTN_BACKEND", value)


def test_env_backend_single_name_applies_where_the_op_has_it(monkeypatch):
    _override(monkeypatch, "torch")
    for name, args, kwargs, _ in calls():
        assert vitattn.explain(name, *args, **kwargs).note == "VITATTN_BACKEND selects 'torch'"
        getattr(vitattn, name)(*args, **kwargs)


def test_env_backend_name_an_op_lacks_warns_once_and_stays_auto(monkeypatch):
    _override(monkeypatch, "cuda")  # only masa has it: masa cannot run it on CPU tensors
    name, args, kwargs, _ = calls()[5]  # group_attention
    with pytest.warns(UserWarning, match="VITATTN_BACKEND='cuda' names no backend of group_attention"):
        vitattn.group_attention(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op and value
        vitattn.group_attention(*args, **kwargs)
    q, k, v, g = calls()[0][1]
    with pytest.raises(vitattn.BackendUnavailableError, match="VITATTN_BACKEND"):
        vitattn.masa(q, k, v, g)


def test_env_backend_pairs(monkeypatch):
    _override(monkeypatch, "masa:torch, dynamixer:torch")
    for name, args, kwargs, _ in calls():
        note = vitattn.explain(name, *args, **kwargs).note
        assert ("torch" in note) == (name in ("masa", "dynamixer")), (name, note)


@pytest.mark.parametrize("value,match", [
    ("masa:nope", "masa has no backend 'nope'"),
    ("flash:torch", "unknown op 'flash'"),
    ("masa:torch,cpu", "not an op:backend pair"),
    ("torch,cpu", "expected one backend name"),
    ("masa:", "not an op:backend pair"),
])
def test_env_backend_bad_value_names_the_variable(monkeypatch, value, match):
    _override(monkeypatch, value)
    name, args, kwargs, _ = calls()[0]
    with pytest.raises(ValueError, match="VITATTN_BACKEND") as info:
        vitattn.masa(*args, **kwargs)
    assert match in str(info.value)


def test_env_module_parses_and_documents_every_variable(monkeypatch):
    for name in ("VITATTN_BACKEND", "VITATTN_CHECK_VALUES", "VITATTN_DENSE_BUDGET_MB", "VITATTN_NO_EXT",
                 "VITATTN_CUDA_ARCHS", "VITATTN_COMPILE_CHECK", "VITATTN_SLOW_TESTS", "TRITON_INTERPRET"):
        assert name in _env.VARIABLES and name in _env.__doc__
    monkeypatch.setenv("VITATTN_SLOW_TESTS", "maybe")
    with pytest.raises(ValueError, match="VITATTN_SLOW_TESTS"):
        _env.flag("VITATTN_SLOW_TESTS")
    monkeypatch.setenv("VITATTN_DENSE_BUDGET_MB", "-3")
    with pytest.raises(ValueError, match="VITATTN_DENSE_BUDGET_MB"):
        _env.dense_budget_bytes()
    with pytest.raises(KeyError, match="VITATTN_OTHER"):
        _env.flag("VITATTN_OTHER")
    # every VITATTN_* name used in the sources is one _env knows
    used = set()
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True) + [os.path.join(ROOT, "setup.py")]:
        if "/build/" in path or "/.git/" in path:
            continue
        with open(path) as f:
            used |= {tok.strip("\"'(),") for tok in f.read().replace("=", " ").split()
                     if tok.strip("\"'(),").startswith("VITATTN_") and tok.strip("\"'(),").isidentifier()}
    assert used <= set(_env.VARIABLES), used - set(_env.VARIABLES)


# ---------------------------------------------------------------- empty inputs


def _empty_calls(device):
    z = lambda *s: torch.randn(*s, device=device)
    return [
        ("masa", (z(0, 2, 3, 4, 8), z(0, 2, 3, 4, 8), z(0, 2, 3, 4, 6), 0.8), {}, (0, 2, 3, 4, 6)),
        ("masa", (z(2, 2, 0, 4, 8), z(2, 2, 0, 4, 8), z(2, 2, 0, 4, 6), 0.8), {"decomposed": True}, (2, 2, 0, 4, 6)),
        ("masa", (z(2, 2, 3, 4, 8), z(2, 2, 3, 4, 8), z(2, 2, 3, 4, 0), 0.8), {}, (2, 2, 3, 4, 0)),
        ("sinkhorn", (z(0, 5, 7),), {}, (0, 5, 7)),
        ("ot_aggregate", (z(0, 2, 9, 4), z(2, 3, 4), z(0, 2, 9, 5)), {}, (0, 2, 3, 5)),
        ("ot_attention", (z(2, 0, 9, 4), z(0, 3, 4), z(2, 0, 9, 5)), {}, (2, 0, 9, 5)),
        ("ot_aggregate", (z(2, 2, 9, 4), z(2, 3, 4), z(2, 2, 9, 0)), {}, (2, 2, 3, 0)),
        ("group_attention", (z(0, 2, 12, 8), z(0, 2, 12, 8), z(0, 2, 12, 5), 3), {}, (0, 2, 12, 5)),
        ("group_attention", (z(2, 2, 0, 8), z(2, 2, 0, 8), z(2, 2, 0, 5), 3), {}, (2, 2, 0, 5)),
        ("dynamixer", (z(0, 6, 8), z(4, 8), z(4), z(36, 12), z(36), 2), {}, (0, 6, 8)),
        ("depthwise_conv2d_nhwc", (z(0, 5, 6, 7), z(7, 1, 3, 3), z(7), 1), {}, (0, 5, 6, 7)),
        ("depthwise_conv2d_nhwc", (z(2, 5, 6, 0), z(0, 1, 3, 3), None, (1, 0)), {}, (2, 5, 4, 0)),
    ]


def _graph_nodes(fn):
    """Names of the autograd nodes reachable from fn."""
    names, todo, seen = [], [fn], set()
    while todo:
        f = todo.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        names.append(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


@pytest.mark.parametrize("i", range(8))
def test_eager_fast_path_matches_the_custom_op(i, monkeypatch):
    """Plain eager calls run the op's implementation through one autograd.Function (or bare
    without gradients), skipping torch.ops' Python layers; values and gradients must be
    bitwise those of the custom op, which runs whenever the fast path is refused."""
    from vitattn.ops import _library

    name, args, kwargs, diff = calls(seed=i)[i]

    def run():
        leaves = [a.detach().requires_grad_() if any(a is t for t in diff) else a for a in args]
        out = getattr(vitattn, name)(*leaves, **kwargs)
        w = torch.randn(out.shape, generator=_gen(7), dtype=out.dtype)
        grads = torch.autograd.grad((out * w).sum(), [t for t in leaves if isinstance(t, torch.Tensor)
                                                      and t.requires_grad])
        return out, grads, _graph_nodes(out.grad_fn)

    out, grads, nodes = run()
    assert any("_eager" in n for n in nodes), nodes  # the fast path ran
    with torch.no_grad():
        assert getattr(vitattn, name)(*args, **kwargs).grad_fn is None
    monkeypatch.setattr(_library, "plain_eager", lambda a: False)
    out_op, grads_op, nodes_op = run()
    assert not any("_eager" in n for n in nodes_op), nodes_op  # the custom op ran
    assert any("vitattn" in n for n in nodes_op), nodes_op
    assert torch.equal(out, out_op)
    for g, g_op in zip(grads, grads_op, strict=True):
        assert torch.equal(g, g_op)


def test_eager_fast_path_refuses_traces_modes_and_subclasses():
    from vitattn.ops._library import plain_eager

    t = torch.randn(3)
    assert plain_eager((t, 1.0, "auto", None)) and plain_eager((torch.nn.Parameter(t),))
    with FakeTensorMode() as mode:
        assert not plain_eager((mode.from_tensor(t),))
    assert plain_eager((t,))  # outside the mode again
    seen = []
    torch.func.vmap(lambda x: seen.append(plain_eager((x,))) or x)(torch.randn(2, 3))
    assert seen == [False]


@pytest.mark.parametrize("i", range(12))
def test_empty_batches_give_empty_results_and_gradients(i):
    name, args, kwargs, want = _empty_calls("cpu")[i]
    backends = [b for b in vitattn.backends(name) if b != "auto"]
    for backend in backends:
        if vitattn.explain(name, *args, **kwargs).reasons()[backend] is not None and backend != "triton":
            continue  # cannot run here (cuda; cpu where it is not built)
        if backend == "triton" and not (vitattn._triton.interpreting()):
            continue
        leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        out = getattr(vitattn, name)(*leaves, **kwargs, backend=backend)
        assert out.shape == want, (backend, out.shape)
        grads = torch.autograd.grad(out.sum(), [t for t in leaves if isinstance(t, torch.Tensor)],
                                    allow_unused=False)
        for t, g in zip([t for t in leaves if isinstance(t, torch.Tensor)], grads):
            assert g.shape == t.shape and (g.numel() == 0 or bool((g == 0).all())), backend


@pytest.mark.parametrize("fn,args,match", [
    ("masa", lambda: (torch.randn(1, 1, 2, 2, 0),) * 3 + (0.5,), "feature dim d >= 1"),
    ("group_attention", lambda: (torch.randn(1, 1, 4, 0),) * 3 + (2,), "feature dim d >= 1"),
    ("sinkhorn", lambda: (torch.randn(2, 0, 3),), "n, m >= 1"),
    ("ot_attention", lambda: (torch.randn(1, 1, 0, 4), torch.randn(1, 3, 4)), "at least one token"),
    ("ot_aggregate", lambda: (torch.randn(1, 1, 5, 4), torch.randn(1, 0, 4)), "at least one reference"),
    ("dynamixer", lambda: (torch.randn(2, 0, 4), torch.randn(2, 4), None, torch.randn(0, 0), None, 2),
     "at least one token"),
])
def test_empty_problem_dims_raise_naming_the_argument(fn, args, match):
    with pytest.raises(ValueError, match=match):
        getattr(vitattn, fn)(*args())


# ---------------------------------------------------------------- no host synchronisation


@pytest.mark.parametrize("i", range(8))
def test_fake_cuda_tensors_need_no_data_dependent_python(i):
    """Every public op with default value checks on fake CUDA tensors: any Python branch on
    tensor data (a host synchronisation on a real GPU) would raise. (Autograd on fake CUDA
    tensors aborts a CPU-only PyTorch, so backward is covered by
    test_fake_cuda_backward_ops_need_no_data.)"""
    name, args, kwargs, diff = calls(seed=1)[i]
    want = getattr(vitattn, name)(*args, **kwargs).shape
    # fake CUDA tensors are made inside the mode (this torch may have no CUDA at all)
    fake = lambda t: torch.empty(t.shape, dtype=t.dtype, device="cuda") if isinstance(t, torch.Tensor) else t
    with FakeTensorMode(allow_non_fake_inputs=False):
        fa = [fake(a) for a in args]
        fk = {k: fake(v) for k, v in kwargs.items()}
        if name == "masa":
            fa[3] = torch.empty(2, device="cuda")  # a gamma tensor: its value check runs
        if name == "sinkhorn":
            fk["a"] = torch.empty(5, device="cuda")  # marginal checks run
        out = getattr(vitattn, name)(*fa, **fk)
        assert out.device.type == "cuda" and out.shape == want


def test_fake_cuda_backward_ops_need_no_data():
    """The backward custom ops (what autograd calls) on fake CUDA tensors."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        e = lambda *s, dt=torch.float32: torch.empty(*s, device="cuda", dtype=dt)
        q, v, lg = e(2, 2, 3, 4, 8), e(2, 2, 3, 4, 6), e(2)
        for dec in (False, True):
            out, vm, lw, lh = torch.ops.vitattn.masa_fwd(q, q, v, lg, 0.5, dec, "triton")
            grads = torch.ops.vitattn.masa_bwd(out, q, q, v, lg, out, vm, lw, lh, 0.5, dec, "triton")
            assert [g.shape for g in grads] == [q.shape, q.shape, v.shape, lg.shape]
        gq, perm = e(2, 2, 12, 8), e(12, dt=torch.int64)
        out, lse = torch.ops.vitattn.group_attention_fwd(gq, gq, gq, perm, 3, 0.3, "triton")
        assert torch.ops.vitattn.group_attention_bwd(out, gq, gq, gq, out, lse, perm, 3, 0.3, "triton")[0].shape \
            == gq.shape
        S, la, lb = e(4, 5, 7), e(4, 5), e(4, 7)
        P, G = torch.ops.vitattn.sinkhorn_fwd(S, la, lb, 0.1, 3, "triton")
        assert torch.ops.vitattn.sinkhorn_bwd(P, S, la, lb, G, 0.1, "triton")[0].shape == S.shape
        x, ref = e(2, 2, 9, 4), e(2, 3, 4)
        for att in (False, True):
            out, zeta, G = torch.ops.vitattn.sinkhorn_ot_fwd(x, ref, x, None, 0.1, 3, att, "triton")
            assert torch.ops.vitattn.sinkhorn_ot_bwd(out, x, ref, x, None, zeta, G, 0.1, att, "triton")[0].shape \
                == x.shape
        xd, wc, wg = e(1, 1, 2, 6, 8), e(4, 8), e(36, 12)
        y, r, lse = torch.ops.vitattn.dynamixer_fwd(xd, wc, None, wg, None, 2, "triton")
        assert torch.ops.vitattn.dynamixer_bwd(y, xd, wc, wg, None, r, lse, 2, False, "triton")[0].shape == xd.shape


def test_value_checks_run_once_per_tensor_version_and_raise_on_cpu():
    g = torch.tensor([0.5, 0.9])
    q = torch.randn(1, 2, 2, 2, 4)
    seen = []
    orig = V.check_values

    def counting(op, check, t, bad, message, **kw):
        seen.append(check)
        return orig(op, check, t, bad, message, **kw)

    vitattn.masa(q, q, q, g)
    key = "gamma in (0, 1]"
    assert V.is_trusted(g, key)  # remembered
    g.mul_(3)  # a new version: checked again, and now it fails
    assert not V.is_trusted(g, key)
    with pytest.raises(ValueError, match=r"gamma values must lie in \(0, 1\]"):
        vitattn.masa(q, q, q, g)
    assert callable(counting)


def test_random_permutations_are_trusted_without_a_check():
    p = vitattn.random_permutation(10)
    assert V.is_trusted(p, "perm is a permutation")
    inv = vitattn.inverse_permutation(p)
    assert V.is_trusted(inv, "perm is a permutation")
    p2 = p.clone()  # a copy is a different tensor: it will be checked
    assert not V.is_trusted(p2, "perm is a permutation")


def test_set_value_checks_modes():
    with pytest.raises(ValueError, match="enabled"):
        vitattn.set_value_checks("sometimes")
    q = torch.randn(1, 2, 2, 2, 4)
    try:
        vitattn.set_value_checks(False)
        vitattn.masa(q, q, q, torch.tensor([0.5, 1.5]))  # not checked
        vitattn.set_value_checks("eager")
        with pytest.raises(ValueError, match="gamma"):
            vitattn.masa(q, q, q, torch.tensor([0.5, 1.5]))
    finally:
        vitattn.set_value_checks(True)


# ---------------------------------------------------------------- start-up and layout


def test_import_is_light_and_first_calls_do_not_import_dynamo():
    code = textwrap.dedent("""
        import sys, torch
        before = set(sys.modules)
        import vitattn
        assert "triton" not in sys.modules, "import vitattn imported triton"
        q = torch.randn(1, 2, 3, 4, 8)
        vitattn.masa(q, q, q, 0.9)
        vitattn.group_attention(q.flatten(2, 3), q.flatten(2, 3), q.flatten(2, 3), 3)
        vitattn.sinkhorn(torch.randn(2, 5, 3))
        vitattn.ot_attention(torch.randn(1, 2, 9, 4), torch.randn(2, 3, 4))
        vitattn.dynamixer(torch.randn(1, 6, 8), torch.randn(4, 8), None, torch.randn(36, 12), None, 2)
        new = set(sys.modules) - before
        bad = sorted(m for m in new if m.startswith(("torch._dynamo", "sympy", "triton")))
        assert not bad, bad[:5]
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VITATTN_BACKEND")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_no_public_function_shadows_a_module_and_ops_have_one_home():
    import importlib
    import types

    for op in ("masa", "sinkhorn", "group_attention", "dynamixer", "depthwise_conv"):
        pkg = importlib.import_module(f"vitattn.ops.{op}")
        assert isinstance(pkg, types.ModuleType)
        for part in ("op", "backends", "torch_impl", "reference"):
            assert isinstance(importlib.import_module(f"vitattn.ops.{op}.{part}"), types.ModuleType)
        assert importlib.import_module(f"vitattn.ops.{op}.backends").dispatcher.names[0] == "auto"
    for fn in ("masa", "sinkhorn", "ot_aggregate", "ot_attention", "group_attention", "dynamixer",
               "depthwise_conv2d_nhwc"):
        assert callable(getattr(vitattn, fn)) and callable(getattr(vitattn.reference, fn))
        assert f"vitattn.{fn}" not in sys.modules and f"vitattn.reference.{fn}" not in sys.modules


def test_kernels_are_leaves():
    """kernels/*.py import nothing from vitattn (they know plain tensors only)."""
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["." * node.level + (node.module or "")]
            for n in names:
                assert not n.startswith("vitattn") and not n.startswith(".."), (path, n)


def test_models_know_no_kernels():
    for path in glob.glob(os.path.join(ROOT, "vitattn", "models", "*.py")) + \
            glob.glob(os.path.join(ROOT, "vitattn", "nn", "*.py")):
        src = open(path).read()
        assert "kernels" not in src.replace("kernel_size", ""), path


def test_auto_choice_is_kept_per_call_signature():
    """"auto" walks the can-run checks once per distinct ctx (a model repeats a few shapes);
    a new ctx walks them again, and the choice is the one the walk gives."""
    from vitattn import _dispatch as D

    calls_seen = []

    def check(ctx, auto):
        calls_seen.append(ctx["n"])
        return None if ctx["n"] % 2 == 0 else "odd sizes are not supported (test)"

    disp = D.Dispatcher("test_op", [D.Backend("even", 10, check, lambda: None),
                                    D.Backend("any", 100, D.any_device, lambda: None)], ("auto", "even", "any"))
    ctx = lambda n: dict(device=torch.device("cpu"), dtype=torch.float32, n=n)
    assert [disp.choose("auto", ctx(4)) for _ in range(3)] == ["even"] * 3
    assert calls_seen == [4]
    assert [disp.choose("auto", ctx(5)) for _ in range(3)] == ["any"] * 3
    assert calls_seen == [4, 5]
    with pytest.raises(D.BackendUnavailableError, match="odd sizes"):
        disp.choose("even", ctx(5))  # a named backend is always checked
    assert calls_seen == [4, 5, 5]


@pytest.mark.parametrize("i", range(8))
def test_inference_mode_gives_the_no_grad_result(i):
    """Tensors made under torch.inference_mode have no version counter, so value checks
    cannot be remembered for them: they run on every call, and the op works."""
    name, args, kwargs, _ = calls(seed=i)[i]
    with torch.no_grad():
        want = getattr(vitattn, name)(*args, **kwargs)
    with torch.inference_mode():
        inf_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)  # inference tensors
        inf_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        for _ in range(2):
            got = getattr(vitattn, name)(*inf_args, **inf_kwargs)
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_inference_mode_permutations_and_gamma_are_still_checked():
    with torch.inference_mode():
        perm = vitattn.random_permutation(12)
        assert perm.is_inference()
        q = torch.randn(1, 2, 12, 8)
        vitattn.group_attention(q, q, q, 3, perm=perm)
        bad = perm.clone()
        bad[0] = bad[1]
        with pytest.raises(ValueError, match="perm must be a permutation"):
            vitattn.group_attention(q, q, q, 3, perm=bad)
        with pytest.raises(ValueError, match="gamma"):
            vitattn.masa(torch.randn(1, 2, 3, 4, 8), torch.randn(1, 2, 3, 4, 8), torch.randn(1, 2, 3, 4, 8),
                         torch.tensor([0.5, 1.5]))


def test_compiled_kernels_check_names_a_build_without_the_kernels(monkeypatch):
    """The one check every op's compiled backend uses to detect an older vitattn._C: the reason
    names the missing kernels and says how to rebuild; the lookup runs once."""
    from types import SimpleNamespace

    from vitattn import _dispatch as D
    from vitattn import _extension

    looked = []
    fake = SimpleNamespace(present_fwd=1, present_bwd=2)
    monkeypatch.setattr(_extension, "ops", lambda: looked.append(1) or fake)
    present = D.compiled_kernels_check("demo kernels", ("present_fwd", "present_bwd"))
    missing = D.compiled_kernels_check("demo kernels", ("present_fwd", "absent_bwd"))
    ctx = {"device": torch.device("cpu")}
    for _ in range(3):
        assert present(ctx, True) is None
        why = missing(ctx, False)
        assert "built without the demo kernels (present_fwd)" in why and "pip install" in why
    assert len(looked) == 2
