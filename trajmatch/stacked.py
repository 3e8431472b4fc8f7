"""K independent networks of one architecture trained as one vectorised function (torch.func).

NetStack is training.py's group of K > 1 networks (training.OneNet is K = 1). The parameters of the
K copies are stacked along a new leading dim and the forward is vmap(functional_call): convolutions
become one grouped convolution, so K small networks cost about as many kernel launches as one. Each
network keeps its own data order and augmentation generator and its own SGD state, so network k
follows the same steps it would take trained alone (equal up to float rounding; tests/test_stacked.py
checks it).

Networks with running statistics (BatchNorm) are not stackable here: vmap cannot update buffers in
place per network. `stackable(net)` says so, and callers fall back to one network at a time.
"""
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from trajmatch.accel import FP32, Accel


class SGDLike(Protocol):
    """What a fresh optimiser is built from (training.SGDSettings; stacked.py does not import training)."""
    lr: float
    momentum: float
    weight_decay: float


def stackable(net: nn.Module) -> bool:
    return next(net.buffers(), None) is None


class NetStack:
    """K copies of one architecture: stacked parameters [K, ...] and a vmapped forward (a training.NetGroup)."""

    def __init__(self, nets: list[nn.Module]):
        if not all(stackable(n) for n in nets):
            raise ValueError("networks with buffers (BatchNorm running stats) cannot be stacked")
        params, _ = stack_module_state(nets)  # detached copies, requires_grad=True
        self.params = params
        self.k = len(nets)
        self.nets = nets  # network(k) copies the trained weights back into these
        self.skeleton = nets[0]  # structure only: functional_call substitutes the stacked weights for its own

    def _one(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.skeleton, params, (x,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [K, B, ...], one batch per network -> [K, B, classes]."""
        return vmap(self._one)(self.params, x)

    def shared_input(self, x: torch.Tensor) -> torch.Tensor:
        """Every network on the same batch x: [B, ...] -> [K, B, classes]."""
        return vmap(self._one, in_dims=(0, None))(self.params, x)

    def load_into(self, k: int, net: nn.Module) -> nn.Module:
        """Copy network k's parameters into `net` (same architecture)."""
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(self.params[name][k])
        return net

    def network(self, k: int) -> nn.Module:
        return self.load_into(k, self.nets[k])

    def train(self) -> None:
        pass  # a functional call has no module mode; stackable networks hold no running statistics

    def sgd(self, s: SGDLike) -> 'StackedSGD':
        if getattr(s, 'kind', 'sgd') != 'sgd':
            raise ValueError(f"a stacked group trains with SGD only, not {s.kind}: train one network at a time")
        return StackedSGD(self.params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def batch_loss(self, clean: list[torch.Tensor], augmented: list[torch.Tensor], targets: list[torch.Tensor], *,
                   loss_scale: float, extra_loss, accel: Accel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """training.NetGroup.batch_loss: network k on batch k."""
        if extra_loss is not None:
            raise ValueError("extra_loss (the gradient penalty) is not vectorised: train one network at a time")
        y = torch.stack(targets)
        with accel.autocast(y.device):
            out = self(torch.stack(augmented))
            # sum over networks of each one's mean CE: network k's gradient is its own loss's gradient
            losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction='none').view(y.shape).mean(1)
            loss = losses.sum()
        return loss * loss_scale, losses.detach() * loss_scale, (out.argmax(-1) == y).sum(1)

    @torch.no_grad()
    def accuracies(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024,
                   accel: Accel = FP32) -> list[float]:
        correct = torch.zeros(self.k, dtype=torch.long, device=images.device)
        for start in range(0, images.shape[0], batch_size):
            with accel.autocast(images.device):
                out = self.shared_input(images[start:start + batch_size])
            correct += (out.argmax(-1) == labels[start:start + batch_size]).sum(1)
        return (correct.double() / images.shape[0]).tolist()


class StackedSGD:
    """torch.optim.SGD's update (momentum, dampening 0, weight decay, no nesterov) on stacked params,
    with its lr shared by all K networks."""

    def __init__(self, params: dict, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.bufs: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for name, p in self.params.items():
            d = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                if name not in self.bufs:
                    self.bufs[name] = torch.clone(d).detach()
                else:
                    self.bufs[name].mul_(self.momentum).add_(d)
                d = self.bufs[name]
            p.add_(d, alpha=-self.lr)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None
