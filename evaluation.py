"""The evaluation protocol (SPEC 9): train fresh networks on a (synthetic) set, score on the real test set.

Protocol: SGD lr = learned syn_lr, momentum 0.9, weight decay 5e-4, batch 256, DSA, lr x0.1 at
epoch E//2+1 (MTT; --lr_decay ast gives AST's x0.5 at E//2), final-epoch test accuracy.
"""
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from networks import get_network
from training import accuracy, train_epoch

LR_DECAYS = {'mtt': 0.1, 'ast': 0.5}  # factor applied once, half way


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


def train_and_test(model: str, data_shape: tuple[int, tuple[int, int], int], images: torch.Tensor,
                   labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor, *,
                   lr: float, epochs: int, seed: int, batch_size: int = 256, lr_decay: str = 'mtt',
                   use_dsa: bool = True) -> float:
    """Train one fresh `model` from seed `seed` on (images, labels); return final test accuracy."""
    channel, im_size, num_classes = data_shape
    device = images.device
    with torch.random.fork_rng(devices=[]):  # evaluation never disturbs the caller's random stream
        torch.manual_seed(seed)
        net = get_network(model, channel, num_classes, im_size).to(device)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        decay_epoch = epochs // 2 + 1 if lr_decay == 'mtt' else epochs // 2
        for ep in range(epochs):
            if ep == decay_epoch:
                for group in opt.param_groups:
                    group['lr'] *= LR_DECAYS[lr_decay]
            train_epoch(net, images, labels, opt, batch_size=batch_size, generator=gen, use_dsa=use_dsa)
        return accuracy(net, test_images, test_labels)


def evaluate_set(models: list[str], data_shape, images: torch.Tensor, labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, *, lr: float, epochs: int,
                 num_eval: int, seed: int, lr_decay: str = 'mtt', progress: bool = True) -> list[EvalResult]:
    """num_eval networks per architecture; network i is seeded with seed + i (same seeds across models)."""
    images, labels = images.detach(), labels.detach()
    results = []
    for model in models:
        res = EvalResult(model)
        for i in tqdm(range(num_eval), desc=f'eval {model}', leave=False, disable=not progress):
            res.accs.append(train_and_test(model, data_shape, images, labels, test_images, test_labels,
                                           lr=lr, epochs=epochs, seed=seed + i, lr_decay=lr_decay))
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
