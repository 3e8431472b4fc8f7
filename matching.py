"""Trajectory matching (SPEC 5): unroll a student on the synthetic set, compare with the expert.

The student is a ReparamModule: its weights are one flat vector w, so an inner SGD step is
w_n = w_{n-1} - α g_n and back-propagating through the unroll reaches the images S and α.
"""
import torch
import torch.nn.functional as F

from augment import dsa


def param_distance_ratio(w: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||w - target||² / ||start - target||²: 1 means no progress, 0 lands on the expert."""
    return (w - target).pow(2).sum() / (start - target).pow(2).sum()


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


def unroll(student, syn_images: torch.Tensor, syn_labels: torch.Tensor, syn_lr: torch.Tensor,
           w0: torch.Tensor, *, syn_steps: int, batch_syn: int, generator: torch.Generator,
           syn_mom: float = 0.0, use_dsa: bool = True, loss_weight: float = 1.0) -> list[torch.Tensor]:
    """Full back-propagation-through-time unroll; returns [w_0, ..., w_N], all in one graph.

    syn_mom > 0 is heavy-ball momentum: b_n = μ b_{n-1} + g_n, w_n = w_{n-1} - α b_n (AST).
    """
    device = syn_images.device
    w = w0.detach().to(device).requires_grad_(True)
    ws, b = [w], None
    for idx in syn_batches(syn_images.shape[0], batch_syn, syn_steps, generator):
        idx = idx.to(device)
        loss = inner_loss(student, w, syn_images[idx], syn_labels[idx], generator=generator,
                          use_dsa=use_dsa, loss_weight=loss_weight)
        g = torch.autograd.grad(loss, w, create_graph=True)[0]
        b = g if (syn_mom == 0.0 or b is None) else syn_mom * b + g
        w = w - syn_lr * b
        ws.append(w)
    return ws


def matching_loss(student, syn_images, syn_labels, syn_lr, start: torch.Tensor, target: torch.Tensor, *,
                  syn_steps: int, batch_syn: int, generator: torch.Generator, syn_mom: float = 0.0,
                  use_dsa: bool = True, loss_weight: float = 1.0) -> torch.Tensor:
    """MTT's loss for one (expert, start epoch): L = ||w_N - θ*_{t+M}||² / ||θ*_t - θ*_{t+M}||²."""
    device = syn_images.device
    start, target = start.to(device), target.to(device)
    ws = unroll(student, syn_images, syn_labels, syn_lr, start, syn_steps=syn_steps, batch_syn=batch_syn,
                generator=generator, syn_mom=syn_mom, use_dsa=use_dsa, loss_weight=loss_weight)
    return param_distance_ratio(ws[-1], start, target)
