"""Supervised training of a group of K >= 1 networks on in-memory tensors, under a step lr schedule.

Used by buffer.py (experts) and evaluation.py (fresh networks on a distilled set). A group is one
plain nn.Module trained with torch.optim.SGD (OneNet, K = 1), or K copies of one architecture
trained as one vmapped function with stacked.StackedSGD (stacked.NetStack, K > 1). Network k draws
its data order and augmentations from generators[k], so it takes the same steps in either group.

The schedule (step_schedule) is the one lr change both MTT's and AST's code make: after a given
epoch the lr is multiplied, and the optimiser is built again (its momentum buffers start from zero).
"""
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F

from trajmatch.accel import FP32, Accel
from trajmatch.augment import dsa
from trajmatch.stacked import NetStack


@dataclass(frozen=True)
class SGDSettings:
    """A fresh optimiser: SGD (the default), or Adam (kind 'adam': the AST authors' --optim ADAM experts;
    momentum unused, default betas)."""
    lr: float
    momentum: float
    weight_decay: float
    kind: str = 'sgd'


def step_schedule(epochs: int, first: SGDSettings, *, change_after: int | None, lr_factor: float,
                  momentum_after: float) -> list[SGDSettings | None]:
    """Per trained epoch 0..epochs-1: the settings of a fresh SGD built before it, or None (keep the optimiser).
    The first is built before epoch 0; after epoch index change_after (None: never) a fresh one with lr x
    lr_factor and momentum_after (the same weight decay and kind of optimiser)."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    builds = {0: first}
    if change_after is not None:
        builds[change_after + 1] = SGDSettings(first.lr * lr_factor, momentum_after, first.weight_decay, first.kind)
    return [builds.get(ep) for ep in range(epochs)]


# Per network: (mean loss, train accuracy) of an epoch, tensors [K] left on the device (no host sync).
EpochStats = tuple[torch.Tensor, torch.Tensor]


class NetGroup(Protocol):
    """K >= 1 networks of one architecture trained together: OneNet (K = 1) or stacked.NetStack (K > 1)."""
    k: int

    def train(self) -> None: ...

    def sgd(self, s: SGDSettings): ...

    def batch_loss(self, clean: list[torch.Tensor], augmented: list[torch.Tensor], targets: list[torch.Tensor], *,
                   loss_scale: float, extra_loss, accel: Accel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch per network -> (loss to backpropagate, per-network loss [K], correct predictions [K])."""

    def accuracies(self, images: torch.Tensor, labels: torch.Tensor, accel: Accel = FP32) -> list[float]: ...

    def network(self, k: int) -> torch.nn.Module:
        """Network k as an nn.Module holding its current weights."""


class OneNet:
    """K = 1: a plain nn.Module and torch.optim.SGD, no vmap."""
    k = 1

    def __init__(self, net: torch.nn.Module):
        self.net = net

    def train(self) -> None:
        self.net.train()

    def sgd(self, s: SGDSettings) -> torch.optim.Optimizer:
        if s.kind == 'adam':
            return torch.optim.Adam(self.net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        return torch.optim.SGD(self.net.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def batch_loss(self, clean, augmented, targets, *, loss_scale: float,
                   extra_loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None, accel: Accel):
        """extra_loss(net, x_clean) is added on the un-augmented batch (AST's gradient penalty, second
        order: kept out of autocast)."""
        (x,), (x_aug,), (y,) = clean, augmented, targets
        with accel.autocast(x.device):
            out = self.net(accel.batch(x_aug))
            loss = F.cross_entropy(out, y) * loss_scale
        if extra_loss is not None:
            loss = loss + extra_loss(self.net, x)
        return loss, loss.detach().view(1), (out.argmax(1) == y).sum().view(1)

    def accuracies(self, images: torch.Tensor, labels: torch.Tensor, accel: Accel = FP32) -> list[float]:
        return [accuracy(self.net, images, labels, accel=accel)]

    def network(self, k: int) -> torch.nn.Module:
        return self.net


def net_group(nets: list[torch.nn.Module], accel: Accel = FP32) -> NetGroup:
    """One network: OneNet (accel's channels_last applies). Several: stacked.NetStack (bf16 autocast
    applies; channels_last does not: stacked weights are 5-D)."""
    return OneNet(accel.net(nets[0])) if len(nets) == 1 else NetStack(nets)


def train_epoch(group: NetGroup, images: torch.Tensor, labels: torch.Tensor, opt, *, batch_size: int,
                generators: list[torch.Generator], use_dsa: bool = True, loss_scale: float = 1.0,
                extra_loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
                accel: Accel = FP32) -> EpochStats:
    """One pass of each network over (images, labels) with opt = group.sgd(...), network k in a random
    order and with augmentations drawn from generators[k]. loss_scale multiplies the cross-entropy (AST's
    loss decay); extra_loss: OneNet.batch_loss (K = 1 only)."""
    if len(generators) != group.k:
        raise ValueError(f"{len(generators)} generators for {group.k} networks")
    group.train()
    n = images.shape[0]
    orders = [torch.randperm(n, generator=g).to(images.device) for g in generators]
    # running sums stay on the device: no host sync per batch
    total_loss = torch.zeros(group.k, device=images.device)
    correct = torch.zeros(group.k, dtype=torch.long, device=images.device)
    for start in range(0, n, batch_size):
        clean, augmented, targets = [], [], []
        for order, g in zip(orders, generators):
            idx = order[start:start + batch_size]
            x = images[idx]
            clean.append(x)
            augmented.append(dsa(x, generator=g) if use_dsa else x)
            targets.append(labels[idx])
        loss, losses, hits = group.batch_loss(clean, augmented, targets, loss_scale=loss_scale,
                                              extra_loss=extra_loss, accel=accel)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total_loss += losses * len(idx)
        correct += hits
    return total_loss / n, correct / n


def train_scheduled(group: NetGroup, images: torch.Tensor, labels: torch.Tensor, schedule: list[SGDSettings | None],
                    *, loss_scale: Callable[[int], float] | None = None, **epoch_kw) -> Iterator[tuple[int, EpochStats]]:
    """Train len(schedule) epochs, building a fresh optimiser where the schedule (step_schedule) says;
    yields (epoch, train_epoch's stats) after each epoch. loss_scale(epoch): None = 1."""
    opt = None
    for epoch, new_sgd in enumerate(schedule):
        if new_sgd is not None:
            opt = group.sgd(new_sgd)
        scale = 1.0 if loss_scale is None else loss_scale(epoch)
        yield epoch, train_epoch(group, images, labels, opt, loss_scale=scale, **epoch_kw)


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
