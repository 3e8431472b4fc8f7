"""The evaluation protocol (SPEC 9): train fresh networks on a (synthetic) set, score on the real test set.

Protocol: SGD lr = learned syn_lr, momentum 0.9, weight decay 5e-4, batch 256, DSA, lr x0.1 at
epoch E//2+1 (MTT; --lr_decay ast gives AST's x0.5 at E//2), final-epoch test accuracy.
"""
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from accel import FP32, Accel
from networks import get_network
from stacked import NetStack, StackedSGD, accuracies_stacked, stackable, train_epoch_stacked
from training import accuracy, train_epoch

LR_DECAYS = {'mtt': 0.1, 'ast': 0.5}  # factor applied once, half way
PARALLEL_EVAL = ('auto', 'loop', 'stack')  # how num_eval networks are trained; see stack_groups


@dataclass
class EvalResult:
    model: str
    accs: list[float] = field(default_factory=list)  # final-epoch test accuracy per network, in [0, 1]

    @property
    def mean(self) -> float:
        return sum(self.accs) / len(self.accs)

    @property
    def std(self) -> float:  # population std, as the MTT/AST tables report
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accs) / len(self.accs))

    def __str__(self) -> str:
        return f"{self.model}: {100 * self.mean:.2f} ± {100 * self.std:.2f} % (n={len(self.accs)})"


def fresh_network(model: str, data_shape: tuple[int, tuple[int, int], int], seed: int,
                  device: torch.device) -> torch.nn.Module:
    """Network `model` initialised from `seed`, without disturbing the caller's random stream."""
    channel, im_size, num_classes = data_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_network(model, channel, num_classes, im_size).to(device)


def decay_epoch(epochs: int, lr_decay: str) -> int:
    return epochs // 2 + 1 if lr_decay == 'mtt' else epochs // 2


def train_and_test(model: str, data_shape: tuple[int, tuple[int, int], int], images: torch.Tensor,
                   labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor, *,
                   lr: float, epochs: int, seed: int, batch_size: int = 256, lr_decay: str = 'mtt',
                   use_dsa: bool = True, accel: Accel = FP32) -> float:
    """Train one fresh `model` from seed `seed` on (images, labels); return final test accuracy."""
    net = accel.net(fresh_network(model, data_shape, seed, images.device))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for ep in range(epochs):
        if ep == decay_epoch(epochs, lr_decay):
            for group in opt.param_groups:
                group['lr'] *= LR_DECAYS[lr_decay]
        train_epoch(net, images, labels, opt, batch_size=batch_size, generator=gen, use_dsa=use_dsa, accel=accel)
    return accuracy(net, test_images, test_labels, accel=accel)


def train_and_test_stacked(model: str, data_shape: tuple[int, tuple[int, int], int], images: torch.Tensor,
                           labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor, *,
                           lr: float, epochs: int, seeds: list[int], batch_size: int = 256,
                           lr_decay: str = 'mtt', use_dsa: bool = True, accel: Accel = FP32) -> list[float]:
    """train_and_test for every seed at once (stacked.NetStack): the same networks, trained together
    (bf16 autocast applies; channels_last does not: stacked weights are 5-D)."""
    stack = NetStack([fresh_network(model, data_shape, s, images.device) for s in seeds])
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    opt = StackedSGD(stack.params, lr=lr, momentum=0.9, weight_decay=5e-4)
    for ep in range(epochs):
        if ep == decay_epoch(epochs, lr_decay):
            opt.lr *= LR_DECAYS[lr_decay]
        train_epoch_stacked(stack, images, labels, opt, batch_size=batch_size, generators=gens, use_dsa=use_dsa,
                            accel=accel)
    return accuracies_stacked(stack, test_images, test_labels, accel=accel)


# Past about this many input pixels per step (K networks x batch x H x W) the stacked activations
# leave the CPU's caches and one network at a time is faster: measured on Digits (8x8) with 5
# ConvNetD2s, stacking won 1.65x at batch 10 and 1.54x at batch 20, lost 0.94x at 50, 0.77x at 100.
CPU_STACK_PIXELS = 128 * 8 * 8


def stack_groups(seeds: list[int], model: str, data_shape, num_images: int, batch_size: int,
                 device: torch.device, parallel: str) -> list[list[int]]:
    """Split the seeds into groups trained together. parallel: 'loop' = one at a time, 'stack' = all
    at once, 'auto' = all at once on CUDA, on CPU as many as fit CPU_STACK_PIXELS per step. Models
    with BatchNorm running statistics always go one at a time (stacked.stackable)."""
    im_size = data_shape[1]
    if parallel == 'loop' or not stackable(fresh_network(model, data_shape, 0, torch.device('cpu'))):
        size = 1
    elif parallel == 'stack' or device.type == 'cuda':
        size = len(seeds)
    else:
        size = max(1, CPU_STACK_PIXELS // (min(batch_size, num_images) * im_size[0] * im_size[1]))
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def evaluate_set(models: list[str], data_shape, images: torch.Tensor, labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, *, lr: float, epochs: int,
                 num_eval: int, seed: int, lr_decay: str = 'mtt', progress: bool = True,
                 parallel: str = 'auto', batch_size: int = 256, accel: Accel = FP32) -> list[EvalResult]:
    """num_eval networks per architecture; network i is seeded with seed + i (same seeds across models).
    `parallel` (see stack_groups) changes only the speed, not the networks."""
    images, labels = images.detach(), labels.detach()
    kw = dict(lr=lr, epochs=epochs, batch_size=batch_size, lr_decay=lr_decay, accel=accel)
    results = []
    for model in models:
        res = EvalResult(model)
        groups = stack_groups([seed + i for i in range(num_eval)], model, data_shape, images.shape[0], batch_size,
                              images.device, parallel)
        for group in tqdm(groups, desc=f'eval {model}', leave=False, disable=not progress):
            if len(group) == 1:
                res.accs.append(train_and_test(model, data_shape, images, labels, test_images, test_labels,
                                               seed=group[0], **kw))
            else:
                res.accs += train_and_test_stacked(model, data_shape, images, labels, test_images, test_labels,
                                                   seeds=group, **kw)
        results.append(res)
    return results


# ---------------------------------------------------------------- baselines

def random_real(data, ipc: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ipc distinct random real train images per class, class-major (also distill's --pix_init real)."""
    xs = [data.sample_real(c, ipc, generator) for c in range(data.num_classes)]
    ys = [torch.full((ipc,), c, dtype=torch.long) for c in range(data.num_classes)]
    return torch.cat(xs), torch.cat(ys)


def markdown_table(results: list[EvalResult], title: str) -> str:
    lines = [f'| {title} | test accuracy % (mean ± std) | networks |', '| --- | --- | --- |']
    lines += [f'| {r.model} | {100 * r.mean:.2f} ± {100 * r.std:.2f} | {len(r.accs)} |' for r in results]
    return '\n'.join(lines)
