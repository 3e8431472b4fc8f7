"""AST components (arXiv 2310.10541), one small pure function each.

The expert-training and distillation loops compose these behind flags
(docs/method.md, sections 1 and 2):

* smooth experts:  ``loss_decay_factor`` (``--loss_decay``) and
  ``gradient_penalty`` (``--gp``);
* distillation:    ``balance_weight`` (``--balance_loss``),
  ``intermediate_steps`` / ``intermediate_betas`` (``--agg_middle_loss``,
  ``--adaptive_middle_loss``), ``perturb_start`` (``--weight_perturb``) and
  ``kmeans_init`` (``--pix_init kmeans``, and the authors' ``avg``).

Where the paper and the authors' code disagree, ``variant='paper'`` follows the
paper and ``variant='code'`` the code; the scripts' flags choose (docs/method.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

VARIANTS = ('paper', 'code')


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


# --------------------------------------------------------------------------
# Smooth experts (docs/method.md, section 1): loss decay and gradient penalty
# --------------------------------------------------------------------------

# λ_e for the first epochs; 1 afterwards (docs/method.md, "Smooth experts", says which source gives which).
LOSS_DECAY = {
    'paper': (0.5, 0.6, 0.7, 0.8, 0.9),                                # paper Sec. V-A: 0.5 -> 1 over 5 epochs
    'code': (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95),  # the authors' buffer.py as released
}


def loss_decay_factor(epoch: int, variant: str = 'paper') -> float:
    """λ_e multiplying the expert's CE loss at (0-based) ``epoch`` (LOSS_DECAY, then 1.0)."""
    _check_variant(variant)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    ramp = LOSS_DECAY[variant]
    return ramp[epoch] if epoch < len(ramp) else 1.0


# μ of each variant: the paper's Sec. V-A sets μ = 1, the authors' released code 2.
# gradient_penalty's own default is the paper's, so callers of the 'code' variant pass
# GP_DEFAULT_MU['code'].
GP_DEFAULT_MU = {'paper': 1.0, 'code': 2.0}


def gradient_penalty(net: nn.Module, x: Tensor, mu: float = 1.0, K: float = 1.0,
                     variant: str = 'paper') -> Tensor:
    """Input-gradient penalty on the summed logits, differentiable in ``net``.

    paper: mu * mean_i (||∇_x Σ_c f(x_i)_c||_2 - K)^2, norm per sample over C,H,W.
    code:  mu * mean_{i,h,w} (||∇_x Σ_c f(x_i)_c [:, h, w]||_2 - K)^2, norm over
           channels per pixel (the authors' utils.py), where they use mu = 2:
           pass ``mu=GP_DEFAULT_MU['code']`` (the default mu is the paper's 1).

    ``x`` is the un-augmented [B, C, H, W] batch; it is not modified.  The
    gradient of the batch sum is taken, which equals the per-sample gradient
    for nets without cross-sample coupling (everything but train-mode BatchNorm).
    """
    _check_variant(variant)
    if x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
    # A fresh leaf, so the caller's tensor neither needs nor gets requires_grad.
    x = x.detach().requires_grad_(True)
    out = net(x)
    # create_graph: the penalty itself is back-propagated into net's parameters.
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    if variant == 'paper':
        norms = grad.flatten(1).norm(dim=1)          # [B]
    else:
        norms = grad.norm(dim=1)                     # [B, H, W]
    return mu * ((norms - K) ** 2).mean()


# --------------------------------------------------------------------------
# Balanced inner loss (docs/method.md, section 2; AST paper Sec. IV-C2)
# --------------------------------------------------------------------------

def balance_weight(t: int, max_start_epoch: int, base: float = 5.0,
                   theta: float = 8.0) -> float:
    """ν multiplying the student's inner CE loss when starting at epoch ``t``.

    middle = T+ // 2; ν = log_b(t - middle + ϑ) for t >= middle, else
    1 / log_b(middle - t + ϑ): early (large-gradient) starts are damped, late
    ones amplified.
    """
    if base <= 0 or base == 1:
        raise ValueError(f"log base must be positive and != 1, got {base}")
    middle = max_start_epoch // 2
    if t >= middle:
        return math.log(t - middle + theta) / math.log(base)
    return math.log(base) / math.log(middle - t + theta)


# --------------------------------------------------------------------------
# Intermediate matching (docs/method.md, section 2; AST paper Sec. IV-D1)
# --------------------------------------------------------------------------

MIDDLE_STEPS = ('code', 'paper')  # --middle_steps: the authors' rule (AST presets, the default) and the paper's


def intermediate_steps(syn_steps: int, expert_epochs: int, rule: str = 'paper') -> list[int]:
    """Student steps n_i, i = 1..M-1, matched to θ*_{t+i}: paper floor(i N / M) (AST Sec. IV-D1); code
    (N // M) * i, the authors' distill.py. They differ only where M does not divide N (N 20, M 3: paper
    6, 13; code 6, 12).

    With N < M some n_i repeat or are 0 (the start itself); the caller decides
    whether that configuration makes sense.
    """
    if syn_steps < 1 or expert_epochs < 1:
        raise ValueError(f"syn_steps and expert_epochs must be >= 1, got "
                         f"{syn_steps} and {expert_epochs}")
    if rule not in MIDDLE_STEPS:
        raise ValueError(f"unknown rule {rule!r}; expected one of {MIDDLE_STEPS}")
    if rule == 'code':
        return [(syn_steps // expert_epochs) * i for i in range(1, expert_epochs)]
    return [i * syn_steps // expert_epochs for i in range(1, expert_epochs)]


def intermediate_betas(expert_epochs: int, adaptive: bool) -> list[float]:
    """β_i for i = 1..M-1: 1, or i / M when adaptive.

    The authors' code weights its k-th intermediate term (k from 0) by
    (k + 1) / (1 + number of terms); with M - 1 terms and i = k + 1 that is i / M:
    later terms, nearer the final target, weigh more.
    """
    if expert_epochs < 1:
        raise ValueError(f"expert_epochs must be >= 1, got {expert_epochs}")
    M = expert_epochs
    if adaptive:
        return [i / M for i in range(1, M)]
    return [1.0] * (M - 1)


# --------------------------------------------------------------------------
# Weight perturbation of the student's start (docs/method.md, "Weight perturbation")
# --------------------------------------------------------------------------

def perturbed_params(shape: Sequence[int], variant: str) -> bool:
    """Which parameters each variant perturbs: the paper's every weight (ndim >= 2: convolutions
    and the classifier), the authors' code only 4-D (convolution) weights."""
    return len(shape) == 4 if variant == 'code' else len(shape) >= 2


def perturb_start(flat: Tensor, param_shapes: Sequence[torch.Size], rho: float = 0.1,
                  generator: torch.Generator | None = None,
                  variant: str = 'paper') -> Tensor:
    """Perturbed copy of the student's starting point θ*_t (a flat vector).

    ``flat`` is laid out as the concatenation of tensors of ``param_shapes``
    (``module.parameters()`` order).  Biases and norm parameters are never perturbed.

    paper (AST paper, Sec. IV-D2): every weight with ndim >= 2; d ~ N(0, 1) with each
           filter (slice along dim 0) rescaled to the norm of θ's filter; result θ + rho * d.
    code (the authors' distill.py): only 4-D (convolution) weights; d ~ N(0, 1) divided by
           its whole-tensor Frobenius norm; result θ + d ⊙ θ.  ``rho`` is not used.

    One d per perturbed tensor is drawn, in parameter order, on the CPU from ``generator``
    (reproducible on any device) and moved to ``flat``'s device and dtype.  Returns a new
    detached tensor.
    """
    _check_variant(variant)
    numels = [math.prod(s) for s in param_shapes]
    if flat.dim() != 1 or flat.numel() != sum(numels):
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}, expected "
                         f"[{sum(numels)}] for the given parameter shapes")
    draw_dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    pieces = []
    with torch.no_grad():
        for w, shape in zip(torch.split(flat.detach(), numels), param_shapes):
            w = w.view(shape)
            if not perturbed_params(shape, variant):
                pieces.append(w.clone())
                continue
            d = torch.randn(shape, generator=generator, dtype=draw_dtype).to(device=flat.device, dtype=flat.dtype)
            # A Gaussian draw is never exactly 0, but guard the divisions anyway.
            tiny = torch.finfo(d.dtype).tiny
            if variant == 'paper':
                d_norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
                w_norm = w.flatten(1).norm(dim=1).view_as(d_norm)
                pieces.append(w + rho * (d / d_norm.clamp_min(tiny) * w_norm))
            else:
                pieces.append(w + d / d.norm().clamp_min(tiny) * w)
    return torch.cat([p.reshape(-1) for p in pieces])


# --------------------------------------------------------------------------
# Representative (K-Means) initialisation of the synthetic set (AST paper Sec. IV-C1)
# --------------------------------------------------------------------------

KMEANS_FEATURES = ('penultimate', 'logits')  # --kmeans_features: the paper's feature space, the authors' code's


def _features(net: nn.Module, images: Tensor, batch_size: int, space: str = 'penultimate') -> np.ndarray:
    """Features of ``images`` as a float64 numpy array, computed where ``net`` is: each batch is moved to the
    network's device (the images may stay on the CPU, where the dataset keeps them). ``space``: penultimate
    (``net.embed``, the input of the last linear layer: the paper's features) or logits (``net(x)``, the
    network's output: what the authors' distill.py clusters)."""
    if space not in KMEANS_FEATURES:
        raise ValueError(f"unknown feature space {space!r}; expected one of {KMEANS_FEATURES}")
    device = next(net.parameters()).device
    fn = net.embed if space == 'penultimate' else net
    with torch.no_grad():
        feats = [fn(images[s:s + batch_size].to(device)).flatten(1).cpu()
                 for s in range(0, len(images), batch_size)]
    return torch.cat(feats).double().numpy()


def _cluster_quotas(ipc: int) -> list[int]:
    """Images per cluster: ipc clusters of 1, or 10 clusters sharing ipc."""
    if ipc <= 10:
        return [1] * ipc
    base, extra = divmod(ipc, 10)
    return [base + (1 if k < extra else 0) for k in range(10)]


def _pick_nearest_distinct(feats: np.ndarray, centroids: np.ndarray,
                           quotas: list[int]) -> list[int]:
    """Rows of ``feats`` nearest each centroid, all distinct, quota per centroid.

    Clusters pick in turns (every cluster's 1st image, then every 2nd, ...), so
    no cluster loses its nearest images to a cluster that asks for many; an
    image already taken is skipped in favour of the next nearest.
    """
    dist = ((feats[None, :, :] - centroids[:, None, :]) ** 2).sum(-1)  # [K, n]
    order = np.argsort(dist, axis=1, kind='stable')
    taken = np.zeros(len(feats), dtype=bool)
    cursor = [0] * len(quotas)
    picks: list[list[int]] = [[] for _ in quotas]
    for _round in range(max(quotas)):
        for k, quota in enumerate(quotas):
            if len(picks[k]) >= quota:
                continue
            while taken[order[k, cursor[k]]]:
                cursor[k] += 1
            i = int(order[k, cursor[k]])
            taken[i] = True
            picks[k].append(i)
    return [i for p in picks for i in p]


def kmeans_init(net: nn.Module, images: Tensor, labels: Tensor, num_classes: int,
                ipc: int, seed: int, batch_size: int = 512,
                per_class: list[Tensor] | None = None, features: str = 'penultimate') -> tuple[Tensor, Tensor]:
    """ipc real images per class nearest the K-Means centroids of their features (``features``: see
    ``_features``; penultimate is the paper's, logits the authors' code's).

    ``net`` is an expert at its final snapshot, already in eval mode (train-mode
    BatchNorm would update its running stats), on any device: features are
    computed there, batch by batch; the images stay where they are.
    Per class: K = ipc clusters for ipc <= 10, else 10 clusters taking
    ipc // 10 images each (the first ipc % 10 clusters one more);
    ``KMeans(n_clusters=K, n_init=10, random_state=seed)``.  The chosen images
    are distinct (see ``_pick_nearest_distinct``).

    ``per_class``: each class's indices into ``images`` where the caller has
    them already (RealData.indices_per_class); else computed from ``labels``.

    Returns (copies of the chosen images [num_classes * ipc, C, H, W], labels),
    class-major, clusters in K-Means order within a class.
    """
    from sklearn.cluster import KMeans  # local: only this initialiser needs it

    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    if per_class is None:
        per_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    # Check every class before clustering any, so a bad ipc fails at once.
    for c, idx in enumerate(per_class):
        if ipc > len(idx):
            raise ValueError(f"ipc {ipc} is larger than class {c}'s {len(idx)} images; "
                             f"lower --ipc")
    quotas = _cluster_quotas(ipc)
    chosen: list[Tensor] = []
    for idx in per_class:
        feats = _features(net, images[idx], batch_size, features)
        km = KMeans(n_clusters=len(quotas), n_init=10, random_state=seed).fit(feats)
        rows = _pick_nearest_distinct(feats, km.cluster_centers_, quotas)
        chosen.append(idx[torch.as_tensor(rows, dtype=torch.long, device=idx.device)])
    sel = torch.cat(chosen)
    # Advanced indexing already copies, so the result never aliases the real set.
    x = images[sel].detach()
    y = torch.arange(num_classes, device=labels.device).repeat_interleave(ipc)
    return x, y.to(labels.dtype)
