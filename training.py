"""Plain supervised training on in-memory tensors: one epoch, and test accuracy.

Used by buffer.py (expert epochs) and evaluation.py (training fresh nets on a distilled set).
"""
from typing import Callable

import torch
import torch.nn.functional as F

from accel import FP32, Accel
from augment import dsa


def train_epoch(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                optimizer: torch.optim.Optimizer, *, batch_size: int, generator: torch.Generator,
                use_dsa: bool = True, loss_scale: float = 1.0,
                extra_loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
                accel: Accel = FP32) -> tuple[float, float]:
    """One pass over (images, labels) in a random order drawn from `generator`.

    loss_scale multiplies the cross-entropy (AST's loss decay); extra_loss(net, x_clean) adds a
    term computed on the un-augmented batch (AST's gradient penalty, second order: kept out of
    autocast). Returns (mean loss, accuracy).
    """
    net.train()
    n = images.shape[0]
    order = torch.randperm(n, generator=generator).to(images.device)
    # running sums stay on the device: one host sync per epoch, not two per batch
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x, y = images[idx], labels[idx]
        x_aug = dsa(x, generator=generator) if use_dsa else x
        with accel.autocast(images.device):
            out = net(accel.batch(x_aug))
            loss = F.cross_entropy(out, y) * loss_scale
        if extra_loss is not None:
            loss = loss + extra_loss(net, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (out.argmax(1) == y).sum()
    return total_loss.item() / n, correct.item() / n


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024,
             accel: Accel = FP32) -> float:
    net.eval()
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, images.shape[0], batch_size):
        with accel.autocast(images.device):
            out = net(accel.batch(images[start:start + batch_size]))
        correct += (out.argmax(1) == labels[start:start + batch_size]).sum()
    net.train()
    return correct.item() / images.shape[0]
