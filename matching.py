"""Trajectory matching (SPEC 5, 7, 12): unroll a student on the synthetic set, compare with the expert.

The student is a ReparamModule: its weights are one flat vector w, so an inner step is
w_n = w_{n-1} - α b_n with b_n = μ b_{n-1} + g_n (μ = 0: plain SGD) and the matching loss reaches
the images S and α. Two ways to get that gradient, equal up to float rounding:
- bptt: keep every step's graph (memory grows with syn_steps x batch_syn);
- recompute: keep only w_n, b_n and what replays each step (batch, augmentation seed), then walk
  backwards rebuilding one step's graph at a time to carry the adjoint (constant graph memory).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from augment import dsa

UNROLLS = ('bptt', 'recompute')
ATT_METRICS = ('l1', 'l2')


# ---------------------------------------------------------------- the loss

@dataclass
class Targets:
    """Where the student should land: θ*_{t+M} at step N, and θ*_{t+i} at step n_i (AST)."""
    start: torch.Tensor                 # θ*_t: every term is normalised by the expert's own distance
    final: torch.Tensor                 # θ*_{t+M}
    middle: list[tuple[int, torch.Tensor, float]] = field(default_factory=list)  # (n_i, θ*_{t+i}, β_i)


def param_distance_ratio(w: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||w - target||² / ||start - target||²: 1 means no progress, 0 lands on the expert."""
    return (w - target).pow(2).sum() / (start - target).pow(2).sum()


def final_step(ws: list[torch.Tensor], target: torch.Tensor, auto_steps: bool, metric: str = 'l1') -> int:
    """N, or ATT's N_opt = argmin_{n >= 1} ||w_n - target|| (no gradient flows through the choice)."""
    if not auto_steps:
        return len(ws) - 1
    p = 1 if metric == 'l1' else 2
    dists = torch.stack([torch.linalg.vector_norm(w.detach() - target, ord=p) for w in ws[1:]])
    return int(dists.argmin()) + 1


def loss_terms(states: dict[int, torch.Tensor], targets: Targets, n_final: int) -> tuple[torch.Tensor, dict]:
    """L = ratio(w_{n_final}) + Σ β_i ratio_i(w_{n_i}); also returns each term for logging."""
    loss = param_distance_ratio(states[n_final], targets.start, targets.final)
    info = {'loss_final': loss.detach()}
    for i, (n, theta, beta) in enumerate(targets.middle, start=1):
        term = param_distance_ratio(states[n], targets.start, theta)
        info[f'loss_mid{i}'] = term.detach()
        loss = loss + beta * term
    return loss, info


# ---------------------------------------------------------------- one inner step, replayable

def syn_batches(num_syn: int, batch_syn: int, syn_steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for N steps: consecutive slices of fresh permutations of S, as MTT."""
    batches, order = [], torch.empty(0, dtype=torch.long)
    for _ in range(syn_steps):
        if len(order) == 0:
            order = torch.randperm(num_syn, generator=generator)
        batches.append(order[:batch_syn])
        order = order[batch_syn:]
    return batches


def inner_loss(student, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator,
               use_dsa: bool = True, loss_weight: float = 1.0) -> torch.Tensor:
    x = dsa(x, generator=generator) if use_dsa else x
    return F.cross_entropy(student(x, w), y) * loss_weight


@dataclass
class Unroll:
    """What the forward pass leaves: states, and how to replay each step exactly."""
    ws: list[torch.Tensor]              # w_0 .. w_N
    bs: list[torch.Tensor | None]       # b_1 .. b_N momentum buffers, index n-1 (None for plain SGD)
    batches: list[torch.Tensor]
    dsa_states: list[torch.Tensor]      # generator state before step n's augmentation


def unroll_steps(student, syn_images, syn_labels, syn_lr, w0, *, syn_steps: int, batch_syn: int,
                 generator: torch.Generator, syn_mom: float = 0.0, use_dsa: bool = True,
                 loss_weight: float = 1.0, keep_graph: bool = True) -> Unroll:
    """The N inner steps. keep_graph=True builds one graph through all of them (bptt);
    False runs them graph-free and only records what replays them (recompute)."""
    device = syn_images.device
    images = syn_images if keep_graph else syn_images.detach()
    alpha = syn_lr if keep_graph else syn_lr.detach()
    w = w0.detach().to(device).requires_grad_(True)
    out = Unroll([w], [], syn_batches(syn_images.shape[0], batch_syn, syn_steps, generator), [])
    b = None
    for idx in out.batches:
        idx = idx.to(device)
        out.dsa_states.append(generator.get_state())
        if not keep_graph:
            w = w.detach().requires_grad_(True)
        loss = inner_loss(student, w, images[idx], syn_labels[idx], generator=generator, use_dsa=use_dsa,
                          loss_weight=loss_weight)
        g = torch.autograd.grad(loss, w, create_graph=keep_graph)[0]
        b = g if (syn_mom == 0.0 or b is None) else syn_mom * b + g
        w = w - alpha * b
        out.ws.append(w if keep_graph else w.detach())
        out.bs.append(b if syn_mom else None)
    return out


def unroll(student, syn_images, syn_labels, syn_lr, w0, **kwargs) -> list[torch.Tensor]:
    """Full back-propagation-through-time unroll; returns [w_0, ..., w_N], all in one graph."""
    return unroll_steps(student, syn_images, syn_labels, syn_lr, w0, keep_graph=True, **kwargs).ws


# ---------------------------------------------------------------- the exact constant-memory backward

def recompute_backward(student, syn_images, syn_labels, syn_lr, fwd: Unroll, seeds: dict[int, torch.Tensor], *,
                       syn_mom: float, use_dsa: bool, loss_weight: float) -> None:
    """Accumulate dL/dS into syn_images.grad and dL/dα into syn_lr.grad (SPEC 12).

    seeds[n] = ∂L/∂w_n from the loss terms. Walking n = max(seeds)..1 with adjoints λ (of w_n) and
    λ_b (of b_n, from the momentum recursion): v = λ_b - α λ is the adjoint of g_n, so
    dα += -b_n·λ, one vector-Jacobian product of g_n with v gives dS and H_n v, and
    λ_{n-1} = λ + H_n v (+ seed), λ_b,{n-1} = μ v. Steps after the last loss term cost nothing.
    """
    alpha = syn_lr.detach()
    n_top = max(seeds)
    lam = seeds[n_top]
    lam_b = torch.zeros_like(lam)
    grad_s = torch.zeros_like(syn_images)
    grad_alpha = torch.zeros_like(alpha)
    images = syn_images.detach().requires_grad_(True)
    for n in range(n_top, 0, -1):
        b_n = fwd.bs[n - 1]
        w_prev = fwd.ws[n - 1].detach().requires_grad_(True)
        replay = torch.Generator().manual_seed(0)
        replay.set_state(fwd.dsa_states[n - 1])
        idx = fwd.batches[n - 1].to(images.device)
        loss = inner_loss(student, w_prev, images[idx], syn_labels[idx], generator=replay, use_dsa=use_dsa,
                          loss_weight=loss_weight)
        g = torch.autograd.grad(loss, w_prev, create_graph=True)[0]
        if b_n is None:
            b_n = g.detach()
        grad_alpha -= (b_n * lam).sum()
        v = lam_b - alpha * lam
        hv, gs = torch.autograd.grad(g, [w_prev, images], grad_outputs=v)
        grad_s += gs
        lam = lam + hv + seeds.get(n - 1, 0)
        lam_b = syn_mom * v
    for param, grad in ((syn_images, grad_s), (syn_lr, grad_alpha)):
        param.grad = grad if param.grad is None else param.grad + grad


# ---------------------------------------------------------------- one matching step, either way

def match_and_backward(student, syn_images, syn_labels, syn_lr, w0: torch.Tensor, targets: Targets, *,
                       syn_steps: int, batch_syn: int, generator: torch.Generator, syn_mom: float = 0.0,
                       use_dsa: bool = True, loss_weight: float = 1.0, unroll_mode: str = 'bptt',
                       auto_steps: bool = False, att_metric: str = 'l1') -> tuple[torch.Tensor, dict]:
    """Unroll from w0, take the matching loss, and accumulate its gradient into syn_images.grad and
    syn_lr.grad. Returns (detached loss, info with the loss terms and the step the loss used)."""
    device = syn_images.device
    targets = Targets(targets.start.to(device), targets.final.to(device),
                      [(n, t.to(device), beta) for n, t, beta in targets.middle])
    kw = dict(syn_steps=syn_steps, batch_syn=batch_syn, generator=generator, syn_mom=syn_mom, use_dsa=use_dsa,
              loss_weight=loss_weight)
    fwd = unroll_steps(student, syn_images, syn_labels, syn_lr, w0, keep_graph=unroll_mode == 'bptt', **kw)
    n_final = final_step(fwd.ws, targets.final, auto_steps, att_metric)
    wanted = {n_final} | {n for n, _, _ in targets.middle}
    if unroll_mode == 'bptt':
        loss, info = loss_terms({n: fwd.ws[n] for n in wanted}, targets, n_final)
        if torch.isfinite(loss):
            loss.backward()
    else:
        leaves = {n: fwd.ws[n].detach().requires_grad_(True) for n in wanted}
        loss, info = loss_terms(leaves, targets, n_final)
        if torch.isfinite(loss):
            grads = torch.autograd.grad(loss, list(leaves.values()))
            recompute_backward(student, syn_images, syn_labels, syn_lr, fwd, dict(zip(leaves, grads)),
                               syn_mom=syn_mom, use_dsa=use_dsa, loss_weight=loss_weight)
    info['n_final'] = n_final
    return loss.detach(), info


def matching_loss(student, syn_images, syn_labels, syn_lr, start: torch.Tensor, target: torch.Tensor, *,
                  syn_steps: int, batch_syn: int, generator: torch.Generator, syn_mom: float = 0.0,
                  use_dsa: bool = True, loss_weight: float = 1.0) -> torch.Tensor:
    """MTT's loss with its graph: L = ||w_N - θ*_{t+M}||² / ||θ*_t - θ*_{t+M}||² (for tests and tools)."""
    device = syn_images.device
    ws = unroll(student, syn_images, syn_labels, syn_lr, start, syn_steps=syn_steps, batch_syn=batch_syn,
                generator=generator, syn_mom=syn_mom, use_dsa=use_dsa, loss_weight=loss_weight)
    return param_distance_ratio(ws[-1], start.to(device), target.to(device))
