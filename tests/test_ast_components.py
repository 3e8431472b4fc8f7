"""Tests for ast_components.py (AST: smooth experts and distillation components)."""
import math

import pytest
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from trajmatch import data
from trajmatch.ast_components import (GP_DEFAULT_MU, balance_weight, gradient_penalty,
                            intermediate_betas, intermediate_steps, kmeans_init,
                            loss_decay_factor, perturb_start)
from networks import ConvNet, get_network
from reparam_module import ReparamModule

# --------------------------------------------------------------------------
# Loss decay
# --------------------------------------------------------------------------


def test_loss_decay_paper_schedule():
    got = [loss_decay_factor(e) for e in range(12)]
    assert got == [0.5, 0.6, 0.7, 0.8, 0.9] + [1.0] * 7


def test_loss_decay_code_schedule():
    got = [loss_decay_factor(e, variant='code') for e in range(12)]
    assert got == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.0]


def test_loss_decay_rejects_unknown_variant():
    with pytest.raises(ValueError):
        loss_decay_factor(0, variant='paper2')


# --------------------------------------------------------------------------
# Gradient penalty
# --------------------------------------------------------------------------

def _tiny_net(seed=0):
    torch.manual_seed(seed)
    return ConvNet(1, 3, (8, 8), width=4, depth=1).double()


def _reference_penalty(net, x, mu, K, variant):
    """Per-sample input gradients by a loop, then the formula by hand."""
    terms = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(xi).sum(), xi, create_graph=True)
        g = g[0]                                   # [C, H, W]
        if variant == 'paper':
            terms.append((torch.sqrt((g ** 2).sum()) - K) ** 2)
        else:
            per_pixel = torch.sqrt((g ** 2).sum(dim=0))   # [H, W]
            terms.append(((per_pixel - K) ** 2).mean())
    return mu * torch.stack(terms).mean()


@pytest.mark.parametrize('variant', ['paper', 'code'])
def test_gradient_penalty_matches_direct_computation(variant):
    net = _tiny_net()
    torch.manual_seed(1)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    x_before = x.clone()
    mu, K = GP_DEFAULT_MU[variant], 0.7
    got = gradient_penalty(net, x, mu=mu, K=K, variant=variant)
    want = _reference_penalty(net, x, mu, K, variant)
    assert got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the caller's batch is neither modified nor turned into a grad leaf
    assert torch.equal(x, x_before) and not x.requires_grad

    # differentiable w.r.t. the parameters, with the same gradient as the reference
    names, params = zip(*net.named_parameters())
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    for p, a, b in zip(params, g_got, g_want):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    grads = dict(zip(names, g_got))
    # the conv and linear weights shape the input gradient, so they get one
    assert grads['features.0.weight'].abs().sum() > 0
    assert grads['classifier.weight'].abs().sum() > 0


def test_gradient_penalty_variants_differ_and_default_mu():
    net = _tiny_net()
    torch.manual_seed(2)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    p = gradient_penalty(net, x)
    assert torch.allclose(p, _reference_penalty(net, x, 1.0, 1.0, 'paper'))
    assert not torch.allclose(p, gradient_penalty(net, x, variant='code'))
    assert GP_DEFAULT_MU == {'paper': 1.0, 'code': 2.0}


# --------------------------------------------------------------------------
# Balanced inner loss
# --------------------------------------------------------------------------

def test_balance_weight_values():
    T, middle = 20, 10
    assert balance_weight(0, T) == pytest.approx(1 / (math.log(18) / math.log(5)), rel=1e-12)
    assert balance_weight(middle, T) == pytest.approx(math.log(8) / math.log(5), rel=1e-12)
    assert balance_weight(T - 1, T) == pytest.approx(math.log(17) / math.log(5), rel=1e-12)
    # below the middle the weight is < 1, growing with t
    assert balance_weight(0, T) < balance_weight(9, T) < 1 < balance_weight(middle, T)
    # base and theta are honoured
    assert balance_weight(3, T, base=math.e, theta=4.0) == pytest.approx(1 / math.log(11), rel=1e-12)


# --------------------------------------------------------------------------
# Intermediate matching
# --------------------------------------------------------------------------

@pytest.mark.parametrize('N, M, want', [(20, 2, [10]), (30, 3, [10, 20]), (7, 3, [2, 4]),
                                        (20, 1, [])])
def test_intermediate_steps(N, M, want):
    assert intermediate_steps(N, M) == want


def test_intermediate_betas():
    assert intermediate_betas(3, adaptive=False) == [1.0, 1.0]
    assert intermediate_betas(1, adaptive=True) == []


@pytest.mark.parametrize('M', [2, 3, 4])
def test_adaptive_betas_are_the_authors_k_plus_1_over_1_plus_terms(M):
    """β_i = i / M; the authors' code weights its k-th term (k from 0) by (k + 1) / (1 + number of terms)."""
    terms = M - 1
    authors = [(k + 1) / (1 + terms) for k in range(terms)]
    assert intermediate_betas(M, adaptive=True) == pytest.approx(authors, rel=0, abs=1e-15)
    assert intermediate_betas(M, adaptive=True) == pytest.approx([i / M for i in range(1, M)], rel=0, abs=1e-15)
    assert intermediate_betas(M, adaptive=False) == [1.0] * terms


# --------------------------------------------------------------------------
# Weight perturbation
# --------------------------------------------------------------------------

def _convnet_flat(dtype=torch.float32):
    torch.manual_seed(0)
    net = get_network('ConvNetD2', 3, 10, (16, 16)).to(dtype)
    rep = ReparamModule(net)
    return rep.flat_param(), rep.param_shapes


def _split(flat, shapes):
    numels = [math.prod(s) for s in shapes]
    return [t.view(s) for t, s in zip(torch.split(flat, numels), shapes)]


def test_perturb_paper_per_filter_norms_and_untouched_1d():
    flat, shapes = _convnet_flat()
    assert sum(len(s) >= 2 for s in shapes) == 3 and sum(len(s) < 2 for s in shapes) == 7
    before = flat.clone()
    rho = 0.1
    new = perturb_start(flat, shapes, rho=rho, generator=torch.Generator().manual_seed(3))
    assert torch.equal(flat, before)                       # input untouched
    assert new.shape == flat.shape and new.dtype == flat.dtype
    for w, w_new in zip(_split(flat, shapes), _split(new, shapes)):
        if w.dim() < 2:
            assert torch.equal(w_new, w)                   # biases / norm params exact
            continue
        diff = (w_new - w).flatten(1).norm(dim=1)
        torch.testing.assert_close(diff, rho * w.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-7)
        assert not torch.equal(w_new, w)


def test_perturb_is_reproducible_per_generator_seed():
    flat, shapes = _convnet_flat()
    a = perturb_start(flat, shapes, generator=torch.Generator().manual_seed(7))
    b = perturb_start(flat, shapes, generator=torch.Generator().manual_seed(7))
    c = perturb_start(flat, shapes, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_perturb_code_variant_is_the_authors_formula_computed_independently():
    """The authors' code, on a tiny network with a fixed generator: for every 4-D (convolution) weight
    in parameter order, d ~ N(0, 1), d <- d / ||d||_F, θ <- θ + d ⊙ θ; everything else untouched
    (the classifier's 2-D weight too)."""
    torch.manual_seed(0)
    net = ConvNet(3, 4, (8, 8), width=5, depth=2).double()
    params = [p.detach().clone() for p in net.parameters()]
    flat = torch.cat([p.reshape(-1) for p in params])
    shapes = [p.shape for p in params]
    gen = torch.Generator().manual_seed(11)
    expected = []
    for p in params:
        if p.dim() == 4:
            d = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            d = d / torch.sqrt((d ** 2).sum())
            p = p + d * p
        expected.append(p.reshape(-1))
    got = perturb_start(flat, shapes, generator=torch.Generator().manual_seed(11), variant='code')
    torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=1e-15)
    moved = [not torch.equal(a, b) for a, b in zip(_split(got, shapes), params)]
    assert moved == [p.dim() == 4 for p in params] and sum(moved) == 2


def test_perturb_paper_magnitude_is_rho_per_filter_of_every_weight():
    """Paper: every weight with ndim >= 2 (classifier included) moves by exactly ρ x its filter norm."""
    flat, shapes = _convnet_flat(torch.float64)
    rho = 0.1
    new = perturb_start(flat, shapes, rho=rho, generator=torch.Generator().manual_seed(5), variant='paper')
    for w, w_new in zip(_split(flat, shapes), _split(new, shapes)):
        if w.dim() >= 2:
            torch.testing.assert_close((w_new - w).norm(), rho * w.norm(), rtol=1e-10, atol=0)
    assert any(len(s) == 2 for s in shapes)


def test_perturb_rejects_wrong_length():
    flat, shapes = _convnet_flat()
    with pytest.raises(ValueError):
        perturb_start(flat[:-1], shapes)


# --------------------------------------------------------------------------
# K-Means (representative) initialisation
# --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits_and_net():
    real = data.load_dataset('Digits')
    torch.manual_seed(0)
    net = get_network('ConvNetW32', 1, 10, (8, 8)).eval()
    # K-Means on ~144 points is ~10x slower with OpenMP threads fighting over
    # busy cores than single-threaded; the results do not depend on it.
    with threadpool_limits(limits=1):
        yield real, net


def _row_index(pool, img):
    """Index of ``img`` among the rows of ``pool`` (exact match), else -1."""
    hits = torch.nonzero((pool.flatten(1) == img.flatten()).all(dim=1)).flatten()
    return int(hits[0]) if len(hits) == 1 else -1


@pytest.mark.parametrize('ipc', [1, 3, 10, 50])
def test_kmeans_init(digits_and_net, ipc):
    real, net = digits_and_net
    seed = 0
    x, y = kmeans_init(net, real.images_train, real.labels_train, real.num_classes, ipc, seed)
    assert x.shape == (real.num_classes * ipc, 1, 8, 8)
    assert torch.equal(y, torch.arange(real.num_classes).repeat_interleave(ipc))
    assert x.data_ptr() != real.images_train.data_ptr()
    for c, idx in enumerate(real.indices_per_class()):
        pool = real.images_train[idx]
        chosen = [_row_index(pool, img) for img in x[c * ipc:(c + 1) * ipc]]
        assert all(i >= 0 for i in chosen)                 # real train images of class c
        assert len(set(chosen)) == ipc                     # all distinct
        if ipc > 10:
            continue
        # refit K-Means on recomputed features: each pick is the image nearest
        # its centroid among those not already picked for an earlier cluster
        with torch.no_grad():
            feats = net.embed(pool).double().numpy()
        centers = KMeans(n_clusters=ipc, n_init=10, random_state=seed).fit(feats).cluster_centers_
        dist = ((feats[None] - centers[:, None]) ** 2).sum(-1)
        n_global_nearest = 0
        for k, i in enumerate(chosen):
            free = [j for j in range(len(pool)) if j not in chosen[:k]]
            assert dist[k, i] == pytest.approx(dist[k, free].min(), rel=1e-9, abs=1e-12)
            n_global_nearest += int(dist[k, i] == dist[k].min())
        assert n_global_nearest >= ipc - 1                 # collisions are rare
        if ipc == 1:
            # one cluster: the image nearest the class mean feature
            mean_dist = ((feats - feats.mean(0)) ** 2).sum(1)
            assert chosen[0] == int(mean_dist.argmin())


def test_kmeans_init_ipc_larger_than_class(digits_and_net):
    real, net = digits_and_net
    smallest = min(len(i) for i in real.indices_per_class())
    with pytest.raises(ValueError, match='larger than class'):
        kmeans_init(net, real.images_train, real.labels_train, real.num_classes, smallest + 1, 0)
    with pytest.raises(ValueError):
        kmeans_init(net, real.images_train, real.labels_train, real.num_classes, 0, 0)


def test_student_start_code_variant_normalises_every_term_by_the_perturbed_start():
    """distill.student_start: the authors' code measures ||start - target||² from the perturbed start, so a
    student that does not move scores exactly 1 on every term; the paper variant keeps θ*_t there."""
    from distill import student_start
    from trajmatch.matching import Targets, loss_terms
    flat, shapes = _convnet_flat(torch.float64)
    final = flat + 0.1 * torch.randn_like(flat)
    mid = [(3, flat + 0.05 * torch.randn_like(flat), 0.5)]
    targets = Targets(flat, final, mid)
    for variant in ('code', 'paper'):
        w0, t = student_start(targets, shapes, perturb=True, variant=variant, rho=0.1,
                              generator=torch.Generator().manual_seed(1))
        assert not torch.equal(w0, flat)
        assert t.final is final and t.middle is mid
        assert (t.start is w0) if variant == 'code' else (t.start is flat)
        _, info = loss_terms({10: w0, 3: w0}, t, 10)
        if variant == 'code':
            torch.testing.assert_close(info['loss_final'], torch.tensor(1.0, dtype=torch.float64))
            torch.testing.assert_close(info['loss_mid1'], torch.tensor(1.0, dtype=torch.float64))
        else:
            assert not torch.isclose(info['loss_final'], torch.tensor(1.0, dtype=torch.float64))
    w0, t = student_start(targets, shapes, perturb=False, variant='code', rho=0.1, generator=torch.Generator())
    assert w0 is flat and t is targets
