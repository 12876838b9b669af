"""vitattn.depthwise_conv2d_nhwc, every backend: values and gradients against the tap-by-tap
reference on fresh random inputs, odd shapes and kernels, strided and permuted inputs,
recycled (poisoned) memory, fp64 gradcheck, thread-count independence, low-precision
fallback, torch.compile / export, inference mode, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitattn
from vitattn import BackendUnavailableError
from vitattn.reference import depthwise_conv2d_nhwc as reference

CPU_OK = vitattn.explain("depthwise_conv2d_nhwc", torch.randn(1, 3, 3, 2), torch.randn(2, 1, 3, 3),
                         None, 1).reasons()["cpu"] is None
BACKENDS = ["torch"] + (["cpu"] if CPU_OK else [])
TOL = {torch.float64: (1e-11, 1e-9), torch.float32: (2e-5, 1e-4)}

# (B, H, W, C, kh, kw, padding): odd sizes, channels off the vector width and beyond a
# channel block (1000 channels x 9 taps of fp32 split into blocks), 1x1 images, rectangular
# kernels, no padding, padding wider than the kernel
SHAPES = [
    (2, 7, 9, 13, 3, 3, 1),
    (1, 5, 6, 40, 5, 5, 2),
    (2, 4, 3, 8, 3, 5, (0, 2)),
    (3, 8, 8, 67, 3, 3, 1),
    (1, 1, 1, 5, 3, 3, 1),
    (2, 6, 5, 9, 3, 3, (3, 4)),
    (1, 6, 7, 1000, 3, 3, 1),
    (2, 5, 4, 24, 1, 1, 0),
    (1, 9, 8, 33, 7, 7, 3),
]


def make(B, H, W, C, kh, kw, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, W, C, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(C, 1, kh, kw, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b


def ref_all(x, w, b, padding, dy):
    leaves = [t.detach().double().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = reference(leaves[0], leaves[1], leaves[2] if b is not None else None, padding)
    return y.detach(), torch.autograd.grad(y, leaves, dy.double())


def run(backend, x, w, b, padding, dy):
    leaves = [t.detach().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = vitattn.depthwise_conv2d_nhwc(leaves[0], leaves[1], leaves[2] if b is not None else None, padding,
                                      backend=backend)
    return y.detach(), torch.autograd.grad(y, leaves, dy)


def check(got, want, dtype, what, scale=False):
    atol, rtol = TOL[dtype]
    if scale:  # weight gradients sum over every position
        atol *= max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_gradients_match_the_reference(backend, dtype, shape):
    B, H, W, C, kh, kw, padding = shape
    for seed, bias in ((0, True), (1, False)):
        x, w, b = make(B, H, W, C, kh, kw, dtype, seed, bias)
        y_shape = reference(x, w, b, padding).shape
        dy = torch.randn(y_shape, generator=torch.Generator().manual_seed(seed + 9), dtype=torch.float64).to(dtype)
        want_y, want_g = ref_all(x, w, b, padding, dy)
        y, grads = run(backend, x, w, b, padding, dy)
        assert y.shape == want_y.shape and y.dtype == dtype and y.is_contiguous()
        check(y, want_y, dtype, "y")
        for name, got, want in zip(("dx", "dweight", "dbias"), grads, want_g):
            check(got, want, dtype, name, scale=name != "dx")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    x, w, b = make(2, 5, 6, 11, 3, 5, torch.float64, 3)
    fn = lambda x, w, b: vitattn.depthwise_conv2d_nhwc(x, w, b, (2, 1), backend=backend)
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, w, b)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_permuted_inputs(backend):
    """x as the channels-last view of an NCHW tensor (channel stride != 1), a slice of a wider
    tensor, and a transposed upstream gradient: same results as contiguous copies."""
    g = torch.Generator().manual_seed(5)
    nchw = torch.randn(2, 19, 7, 9, generator=g)
    wide = torch.randn(2, 14, 9, 40, generator=g)[:, ::2, :, 3:22]  # (2, 7, 9, 19), strides everywhere
    w, b = torch.randn(19, 1, 3, 3, generator=g), torch.randn(19, generator=g)
    for x in (nchw.permute(0, 2, 3, 1), wide):
        assert not x.is_contiguous()
        dy = torch.randn(2, 9, 7, 19, generator=g).transpose(1, 2)  # (2, 7, 9, 19), not contiguous
        y, grads = run(backend, x, w, b, 1, dy)
        y_c, grads_c = run(backend, x.contiguous(), w, b, 1, dy.contiguous())
        torch.testing.assert_close(y, y_c, atol=1e-6, rtol=1e-6)
        for a, c in zip(grads, grads_c):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
        want_y, want_g = ref_all(x, w, b, 1, dy)
        check(y, want_y, torch.float32, "y")
        for name, got, want in zip(("dx", "dweight", "dbias"), grads, want_g):
            check(got, want, torch.float32, name, scale=name != "dx")


@pytest.mark.skipif(not CPU_OK, reason="the C++ CPU kernels are not built")
def test_recycled_memory_is_fully_overwritten():
    """Outputs come from the allocator: fill freed memory with NaN first, so any element the
    kernels forget to write shows."""
    x, w, b = make(3, 11, 10, 37, 5, 3, torch.float32, 7)
    dy = torch.randn(3, 11, 10, 37)
    for _ in range(3):
        junk = [torch.full((3 * 11 * 10 * 37 + k,), float("nan")) for k in range(0, 64, 8)]
        del junk
        y, grads = run("cpu", x, w, b, (2, 1), dy)
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    want_y, _ = ref_all(x, w, b, (2, 1), dy)
    check(y, want_y, torch.float32, "y")


@pytest.mark.skipif(not CPU_OK, reason="the C++ CPU kernels are not built")
def test_results_do_not_depend_on_the_thread_count():
    x, w, b = make(4, 13, 12, 50, 3, 3, torch.float32, 11)
    dy = torch.randn(4, 13, 12, 50, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, grads = run("cpu", x, w, b, 1, dy)
            outs.append((y,) + tuple(grads))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert torch.equal(a, c)


@pytest.mark.skipif(not CPU_OK, reason="the C++ CPU kernels are not built")
def test_only_the_gradients_asked_for_are_computed():
    x, w, b = make(2, 6, 5, 9, 3, 3, torch.float64, 4)
    ops = torch.ops.vitattn_C
    dy = torch.randn(2, 6, 5, 9, dtype=torch.float64)
    dx, dw, db = ops.depthwise_conv_cpu_bwd(dy, x, w, 1, 1, False, True, False)
    assert dx.numel() == 0 and db.numel() == 0 and dw.shape == w.shape
    # only the bias of a layer whose weight is frozen
    w.requires_grad_(False)
    bb = b.clone().requires_grad_()
    y = vitattn.depthwise_conv2d_nhwc(x, w, bb, 1)
    (g,) = torch.autograd.grad(y, [bb], dy)
    torch.testing.assert_close(g, dy.sum((0, 1, 2)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_runs_on_torch_and_cpu_says_why_not(dtype):
    x, w, b = make(2, 5, 6, 8, 3, 3, dtype, 0)
    ex = vitattn.explain("depthwise_conv2d_nhwc", x, w, b, 1)
    assert ex.chosen == "torch"
    if CPU_OK:  # (without the extension, the cpu backend's reason is that instead)
        assert "float32 and float64" in ex.reasons()["cpu"]
        with pytest.raises(BackendUnavailableError, match="float32 and float64"):
            vitattn.depthwise_conv2d_nhwc(x, w, b, 1, backend="cpu")
    y = vitattn.depthwise_conv2d_nhwc(x, w, b, 1)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), reference(x.double(), w.double(), b.double(), 1), atol=3e-2, rtol=3e-2)


def test_autocast_runs_in_the_autocast_dtype():
    x, w, b = make(2, 5, 6, 8, 3, 3, torch.float32, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = vitattn.depthwise_conv2d_nhwc(x, w, b, 1)
    assert y.dtype == torch.bfloat16


def test_matches_pytorch_convolution():
    """The op is F.conv2d on the channels-last view."""
    x, w, b = make(2, 9, 7, 21, 5, 5, torch.float32, 8)
    want = F.conv2d(x.permute(0, 3, 1, 2), w, b, 1, 2, 1, 21).permute(0, 2, 3, 1)
    torch.testing.assert_close(vitattn.depthwise_conv2d_nhwc(x, w, b, 2), want, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not CPU_OK, reason="the C++ CPU kernels are not built")
def test_auto_follows_the_measurements_per_shape_class_and_mode():
    """"auto" takes the committed ranking of the call's class (taps, image size, channels, and
    whether a backward is recorded: forward and backward rank differently); classes the
    benchmark did not measure keep the static order (cpu first)."""
    from vitattn.ops.depthwise_conv.backends import dispatcher, shape_class

    table = dispatcher.measured().get("cpu", {})
    assert table, "measured.json has no CPU ranking"
    for (hw, C, k) in ((56, 64, 3), (56, 192, 3), (14, 768, 3), (7, 512, 5), (9, 21, 5)):
        x, w, b = make(1, hw, hw, C, k, k, torch.float32, 0)
        for grad in (False, True):
            args = [t.requires_grad_(grad) for t in (x, w, b)]
            ctx = dict(kh=k, kw=k, HW=hw * hw, C=C, grad=grad)
            want = (table.get(shape_class(ctx)) or ["cpu"])[0]
            assert vitattn.explain("depthwise_conv2d_nhwc", *args, k // 2).chosen == want, (hw, C, k, grad)
    with torch.no_grad():  # no backward recorded: the inference ranking
        x, w, b = make(1, 56, 56, 64, 3, 3, torch.float32, 0)
        want = (table.get(shape_class(dict(kh=3, kw=3, HW=56 * 56, C=64, grad=False))) or ["cpu"])[0]
        assert vitattn.explain("depthwise_conv2d_nhwc", x.requires_grad_(), w, b, 1).chosen == want


def test_inference_mode():
    x, w, b = make(2, 6, 6, 10, 3, 3, torch.float32, 1)
    with torch.inference_mode():
        y = vitattn.depthwise_conv2d_nhwc(x, w, b, 1)
    torch.testing.assert_close(y, reference(x, w, b, 1), atol=2e-5, rtol=1e-4)


def test_compile_fullgraph_and_export_keep_the_custom_op():
    x, w, b = make(2, 6, 5, 10, 3, 3, torch.float32, 2)
    fn = lambda x, w, b: vitattn.depthwise_conv2d_nhwc(x, w, b, 1)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(x, w, b), fn(x, w, b))

    class M(torch.nn.Module):
        def forward(self, x, w, b):
            return fn(x, w, b)

    ep = torch.export.export(M(), (x, w, b))
    assert any("depthwise_conv2d_nhwc_fwd" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x, w, b), fn(x, w, b))


@pytest.mark.parametrize("args,err,match", [
    (lambda: (torch.randn(2, 5, 5), torch.randn(5, 1, 3, 3)), ValueError, "x must have 4 dimensions"),
    (lambda: (torch.randn(2, 5, 5, 4), torch.randn(4, 3, 3)), ValueError, "weight must have 4 dimensions"),
    (lambda: (torch.randn(2, 5, 5, 4), torch.randn(3, 1, 3, 3)), ValueError, r"weight must have shape \(C, 1, kh, kw\)"),
    (lambda: (torch.randn(2, 5, 5, 4), torch.randn(4, 2, 3, 3)), ValueError, r"weight must have shape \(C, 1, kh, kw\)"),
    (lambda: (torch.randn(2, 5, 5, 4), torch.randn(4, 1, 3, 3, dtype=torch.float64)), TypeError, "weight has dtype"),
    (lambda: (torch.randn(2, 5, 5, 4), torch.randn(4, 1, 3, 3), torch.randn(5)), ValueError, "bias must have shape"),
    (lambda: (torch.randint(0, 3, (2, 5, 5, 4)), torch.randn(4, 1, 3, 3)), TypeError, "x must be float16"),
    (lambda: (torch.randn(2, 5, 5, 4), torch.randn(4, 1, 3, 3), None, -1), ValueError, "padding must be >= 0"),
    (lambda: (torch.randn(2, 5, 5, 4), torch.randn(4, 1, 3, 3), None, 1.5), TypeError, "padding must be an int"),
    (lambda: (torch.randn(2, 5, 5, 4), torch.randn(4, 1, 3, 3), None, (1, 1, 1)), ValueError, "padding must be an int or a pair"),
    (lambda: (torch.randn(2, 2, 5, 4), torch.randn(4, 1, 3, 3)), ValueError, "smaller than the 3x3 kernel"),
])
def test_bad_input_names_the_argument(args, err, match):
    with pytest.raises(err, match=match):
        vitattn.depthwise_conv2d_nhwc(*args())


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend"):
        vitattn.depthwise_conv2d_nhwc(torch.randn(1, 3, 3, 2), torch.randn(2, 1, 3, 3), None, 1, backend="triton")
