"""The synthetic set distill.py learns: its initialisation (random real images, noise, or AST's K-Means
selection on expert features) and the object that holds it with syn_lr and both optimisers.
"""
import copy

import torch

from trajmatch.ast_components import kmeans_init
from trajmatch.evaluation import random_real
from reparam_module import load_flat_
from trajmatch.trajectory_io import expert_loader


def init_synthetic(data, ipc: int, pix_init: str, generator: torch.Generator, *, expert_net=None,
                   seed: int = 0, features: str = 'penultimate') -> tuple[torch.Tensor, torch.Tensor]:
    """pix_init real / noise / kmeans or avg (K-Means on the expert's `features`: penultimate or logits)."""
    if pix_init == 'real':
        return random_real(data, ipc, generator)
    if pix_init in ('kmeans', 'avg'):
        return kmeans_init(expert_net.eval(), data.images_train, data.labels_train, data.num_classes, ipc, seed,
                           per_class=data.indices_per_class(), features=features)
    labels = torch.arange(data.num_classes).repeat_interleave(ipc)
    return torch.randn(len(labels), data.channel, *data.im_size, generator=generator), labels


def final_expert_net(files: list[str], mct: bool, net: torch.nn.Module) -> torch.nn.Module:
    """The first expert at its last epoch, for K-Means features."""
    traj = expert_loader(mct)(files[0])[0]
    load_flat_(net, traj.at(traj.num_epochs))
    return net


class SyntheticSet:
    """What distillation learns: the images, their labels (fixed), the student lr syn_lr, and the two
    SGD optimisers (momentum 0.5, as MTT). state_dict / load_state_dict are the checkpoint's part."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, lr_teacher: float, *, lr_img: float,
                 lr_lr: float):
        self.images = images.requires_grad_(True)
        self.labels = labels
        self.lr = torch.tensor(lr_teacher, device=images.device, requires_grad=True)
        self.opt_img = torch.optim.SGD([self.images], lr=lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.lr], lr=lr_lr, momentum=0.5)

    def __len__(self) -> int:
        return self.images.shape[0]

    def set_step_sizes(self, lr_img: float, lr_lr: float) -> None:
        """The flags are the truth: a --resume override of --lr_img / --lr_lr takes effect here."""
        self.opt_img.param_groups[0]['lr'], self.opt_lr.param_groups[0]['lr'] = lr_img, lr_lr

    def zero_grad(self) -> None:
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)

    def finite(self) -> bool:
        """Images and syn_lr hold finite numbers (a step can overflow them: nothing then saves them)."""
        return bool(torch.isfinite(self.images).all() and torch.isfinite(self.lr))

    def grads(self) -> list[torch.Tensor]:
        return [self.images.grad, self.lr.grad]

    def grads_finite(self) -> bool:
        return self.images.grad is not None and bool(torch.isfinite(self.images.grad).all()
                                                     and torch.isfinite(self.lr.grad))

    def step(self) -> bool:
        """syn_lr's SGD step, then the images', unless syn_lr would leave (0, inf): then syn_lr and its
        momentum are put back and the images never take the step. Returns whether the step was taken."""
        before, state = self.lr.detach().clone(), copy.deepcopy(self.opt_lr.state_dict())
        self.opt_lr.step()
        if not bool(torch.isfinite(self.lr) & (self.lr > 0)):
            with torch.no_grad():
                self.lr.copy_(before)
            self.opt_lr.load_state_dict(state)
            return False
        self.opt_img.step()
        return True

    def state_dict(self) -> dict:
        return {'images': self.images.detach().cpu(), 'syn_lr': self.lr.detach().cpu(), 'labels': self.labels.cpu(),
                'opt_img': self.opt_img.state_dict(), 'opt_lr': self.opt_lr.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """copy_ and load_state_dict: onto this set's device. ValueError when the state is another run's."""
        images, lr = state['images'], state['syn_lr']
        if not (torch.is_tensor(images) and images.shape == self.images.shape and torch.is_tensor(lr)
                and lr.numel() == 1):
            raise ValueError(f"images of shape {tuple(getattr(images, 'shape', ()))}, this run's are "
                             f"{tuple(self.images.shape)}")
        with torch.no_grad():
            self.images.copy_(images)
            self.lr.copy_(lr.reshape(()))
        self.opt_img.load_state_dict(state['opt_img'])
        self.opt_lr.load_state_dict(state['opt_lr'])
