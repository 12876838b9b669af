"""SeTformer's Nyström kernel embedding (vitattn.nn.nystrom): the inverse square root and its
gradient, the embedding against its formula, k-means initialisation, and the SeT layer with the
embedding against a dense formula; the default of the named configurations."""

import math

import pytest
import torch

import vitattn.models as models
from vitattn.models import setformer as st
from vitattn.nn.nystrom import NystromEmbedding, inverse_sqrt_psd, spherical_kmeans

from _models_util import one_thread  # noqa: F401


def random_psd(k, rank=None, seed=0, dtype=torch.float64, batch=()):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(*batch, k, rank or k, generator=g, dtype=dtype)
    return b @ b.mT / k


# ---------------------------------------------------------------- inverse square root


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_inverse_sqrt_is_exact(eps):
    a = random_psd(7, batch=(3,))
    y = inverse_sqrt_psd(a, eps)
    reg = a + eps * torch.eye(7, dtype=a.dtype)
    # Y (A + eps I) Y = I and Y symmetric positive definite
    torch.testing.assert_close(y @ reg @ y, torch.eye(7, dtype=a.dtype).expand(3, 7, 7), atol=1e-9, rtol=0)
    torch.testing.assert_close(y, y.mT, atol=1e-12, rtol=0)
    assert (torch.linalg.eigvalsh(y) > 0).all()
    # rank-deficient and with repeated eigenvalues (identity blocks): still finite and exact
    low = random_psd(6, rank=2, seed=1)
    for m in (low, torch.eye(5, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)):
        y = inverse_sqrt_psd(m, eps)
        n = m.shape[-1]
        torch.testing.assert_close(y @ (m + eps * torch.eye(n, dtype=m.dtype)) @ y, torch.eye(n, dtype=m.dtype),
                                   atol=1e-8, rtol=0)


@pytest.mark.parametrize("case", ["generic", "repeated", "rank_deficient"])
def test_inverse_sqrt_gradcheck(case):
    if case == "generic":
        a = random_psd(5, seed=2)
    elif case == "repeated":  # eigenvalues 1, 1, 1, 2, 2: the divided differences meet their limit
        q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
        a = q @ torch.diag(torch.tensor([1.0, 1, 1, 2, 2], dtype=torch.float64)) @ q.mT
    else:
        a = random_psd(5, rank=2, seed=4)
    a.requires_grad_(True)
    # the function of a symmetric argument; a non-symmetric perturbation acts through (a + a^T) / 2
    assert torch.autograd.gradcheck(lambda t: inverse_sqrt_psd(t, 0.05), (a,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_inverse_sqrt_low_precision_and_bad_input():
    a = random_psd(6, dtype=torch.float32)
    y16 = inverse_sqrt_psd(a.to(torch.bfloat16), 1e-2)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), inverse_sqrt_psd(a, 1e-2), atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="a must be"):
        inverse_sqrt_psd(torch.ones(3, 4))
    with pytest.raises(TypeError, match="floating"):
        inverse_sqrt_psd(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        inverse_sqrt_psd(a, 0.0)


# ---------------------------------------------------------------- the embedding


def test_embedding_matches_its_formula_and_reproduces_the_kernel():
    torch.manual_seed(5)
    emb = NystromEmbedding(6, 5, heads=2, sigma=0.7, eps=1e-6).double()
    x = torch.randn(3, 2, 11, 6, dtype=torch.float64)
    got = emb(x)
    # written out: Gaussian kernel exp(-|z - x|^2 / (2 sigma^2)) between unit vectors
    z = emb.anchors / emb.anchors.norm(dim=-1, keepdim=True)
    xn = x / x.norm(dim=-1, keepdim=True)
    kzx = torch.exp(-((xn.unsqueeze(-2) - z.unsqueeze(-3)) ** 2).sum(-1) / (2 * 0.7 ** 2))  # (3, 2, 11, 5)
    kzz = torch.exp(-((z.unsqueeze(-2) - z.unsqueeze(-3)) ** 2).sum(-1) / (2 * 0.7 ** 2))
    lam, vec = torch.linalg.eigh(kzz + 1e-6 * torch.eye(5, dtype=torch.float64))
    want = kzx @ (vec @ torch.diag_embed(lam.rsqrt()) @ vec.mT)
    assert got.shape == (3, 2, 11, 5)
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-7)
    # on the anchors themselves the embedding reproduces the kernel exactly: <v(z_i), v(z_j)> = k(z_i, z_j)
    vz = emb(emb.anchors.unsqueeze(0))
    torch.testing.assert_close(vz @ vz.mT, kzz.unsqueeze(0), atol=1e-5, rtol=1e-5)


def test_embedding_gradcheck():
    torch.manual_seed(6)
    emb = NystromEmbedding(4, 3, heads=2, sigma=0.8, eps=1e-2).double()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, z: NystromEmbedding.forward(_with_anchors(emb, z), t),
                                    (x, emb.anchors.detach().clone().requires_grad_(True)), eps=1e-6, atol=1e-6)


def _with_anchors(emb, z):
    clone = NystromEmbedding(emb.dim, emb.num_anchors, emb.heads, emb.sigma, emb.eps).double()
    del clone.anchors
    clone.anchors = z  # a plain tensor: gradcheck differentiates through it
    return clone


def test_kmeans_init():
    g = torch.Generator().manual_seed(7)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    # 4 tight clusters on the sphere: k-means finds their centres
    pts = centres.repeat_interleave(50, 0) + 0.01 * torch.randn(200, 8, generator=g, dtype=torch.float64)
    got = spherical_kmeans(pts, 4, iters=10, generator=torch.Generator().manual_seed(0)).double()
    assert torch.allclose(got.norm(dim=-1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    match = (got @ centres.T).max(dim=0).values
    assert (match > 0.999).all(), match
    emb = NystromEmbedding(8, 4, heads=2)
    feats = torch.stack([pts, -pts]).float().unsqueeze(0)  # (1, heads, n, dim)
    emb.init_kmeans_(feats, iters=10, generator=torch.Generator().manual_seed(0))
    assert ((emb.anchors[0].double() @ centres.T).max(dim=0).values > 0.999).all()
    assert ((emb.anchors[1].double() @ -centres.T).max(dim=0).values > 0.999).all()
    with pytest.raises(ValueError, match="at least k"):
        spherical_kmeans(pts[:3], 4)


# ---------------------------------------------------------------- in the SeT layer and the model


def test_set_layer_with_nystrom_matches_dense_formula():
    torch.manual_seed(8)
    layer = st.SeTAttention(12, 2, ref_side=2, eps=0.2, iters=4, tau=0.3, attn_backend="torch",
                            num_anchors=5, sigma=0.6).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    B, H, W = 2, 3, 5
    x = torch.randn(B, H, W, 12, dtype=torch.float64)
    h, d, m, n = 2, 6, 4, H * W
    f = layer.feat(x).reshape(B, n, h, d).transpose(1, 2)
    z = layer.embed.anchors / layer.embed.anchors.norm(dim=-1, keepdim=True)
    fn = f / f.norm(dim=-1, keepdim=True)
    kzx = torch.exp((fn @ z.mT - 1) / 0.36)
    kzz = torch.exp((z @ z.mT - 1) / 0.36)
    lam, vec = torch.linalg.eigh(kzz + 1e-3 * torch.eye(5, dtype=torch.float64))
    psi = kzx @ (vec @ torch.diag_embed(lam.rsqrt()) @ vec.mT)  # (B, h, n, 5)
    y = layer.ref / layer.ref.norm(dim=-1, keepdim=True)
    v = layer.v(x).reshape(B, n, h, d).transpose(1, 2)
    filt = layer.position_filter(H, W, x.device, torch.float64)
    K = torch.einsum("bhnk,hmk->bhnm", psi, y) * filt / layer.eps
    la = math.log(m / n)
    g = torch.zeros(B, h, 1, m, dtype=torch.float64)
    for _ in range(layer.iters):
        fpot = la - torch.logsumexp(K + g, dim=-1, keepdim=True)
        g = -torch.logsumexp(K + fpot, dim=-2, keepdim=True)
    T = torch.exp(K + fpot + g) * filt
    want = layer.proj(((n / m) * T @ (T.transpose(-1, -2) @ v)).transpose(1, 2).reshape(B, H, W, 12))
    torch.testing.assert_close(layer(x), want, atol=1e-10, rtol=1e-9)
    assert torch.autograd.gradcheck(layer, (x[:1, :2, :3].clone().requires_grad_(True),), fast_mode=True)


# parameters with the Nyström embedding (the default) and with the L2-normalised form
NYSTROM_COUNTS = {"setformer_mini": 16_098_600, "setformer_tiny": 28_420_744, "setformer_small": 51_522_040,
                  "setformer_base": 90_807_976}


@pytest.mark.parametrize("name", sorted(NYSTROM_COUNTS))
def test_named_configs_default_to_nystrom(name):
    with torch.device("meta"):
        model = models.create_model(name)
        plain = models.create_model(name, embedding="normalized")
    layers = [m for m in model.modules() if isinstance(m, st.SeTAttention)]
    assert layers and all(m.embedding == "nystrom" and m.embed.num_anchors == m.head_dim for m in layers)
    assert all(m.embedding == "normalized" and not hasattr(m, "embed")
               for m in plain.modules() if isinstance(m, st.SeTAttention))
    n = sum(p.numel() for p in model.parameters())
    assert n == NYSTROM_COUNTS[name]
    # the anchors add heads * head_dim^2 per layer
    assert n - sum(p.numel() for p in plain.parameters()) == sum(m.embed.anchors.numel() for m in layers)
    if name == "setformer_mini":
        assert abs(n - 16e6) / 16e6 < 0.02  # the paper's ~16M


def test_model_kmeans_init_and_training_step():
    torch.manual_seed(9)
    model = st.SeTformer(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 8], ref_sides=[2, 2, 2, 1],
                         num_classes=3, attn_backend="torch")
    x = torch.randn(2, 3, 96, 96)
    before = [m.embed.anchors.clone() for m in model.modules() if isinstance(m, st.SeTAttention)]
    model.init_anchors_kmeans(x, iters=5, generator=torch.Generator().manual_seed(0))
    after = [m.embed.anchors for m in model.modules() if isinstance(m, st.SeTAttention)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.allclose(a.norm(dim=-1), torch.ones(a.shape[:-1])) for a in after)
    assert model.training  # the mode is restored
    out = model(x)
    out.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with pytest.raises(ValueError, match="embedding"):
        st.SeTAttention(16, 2, embedding="gaussian")


def test_eval_mode_keeps_the_projection_and_follows_the_anchors():
    """Eval mode caches k(Z, Z)^(-1/2) (no eigendecomposition per forward; a constant for export);
    it gives what training mode computes, and follows anchors changed in place or loaded."""
    torch.manual_seed(0)
    emb = NystromEmbedding(8, 6, heads=2)
    x = torch.randn(3, 2, 5, 8)
    with torch.no_grad():
        train_out = emb(x)
        emb.eval()
        assert emb._projection_cache is not None
        assert torch.equal(emb(x), train_out)
        emb.anchors.add_(0.1 * torch.randn_like(emb.anchors))  # in place, in eval mode
        changed = emb(x)
        assert torch.equal(changed, emb.train()(x))
        emb.eval()
        emb.load_state_dict({"anchors": torch.randn(2, 6, 8)})
        loaded = emb(x)
        assert torch.equal(loaded, emb.train()(x))
        assert not torch.allclose(loaded, changed)
    assert emb._projection_cache is None  # training mode computes it (with its gradient)
    assert "_projection_cache" not in emb.state_dict()
