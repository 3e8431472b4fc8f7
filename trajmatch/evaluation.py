"""The evaluation protocol: train fresh networks on a (synthetic) set, score them on the real test set.

Two schedules, each as its authors' evaluate_synset (utils.py) runs it, with E = epoch_eval_train:
  mtt (GeorgeCazenavette/mtt-distillation): E+1 epochs (0..E) of SGD, lr = the learned lr, momentum
      0.9, weight decay 5e-4, batch 256, DSA; after epoch E//2+1 the lr is x0.1 and the optimiser is
      built again (its momentum buffer starts from zero); test accuracy after the last epoch.
  ast (shenjiyuan123/AST-Alignment-with-Smooth-Expert): the same with weight decay 1e-3; after epoch
      E//2+1 the lr is x0.5 and the optimiser is rebuilt with momentum 0.8; the authors also test after
      every epoch with ep % 20 == 0 and report the maximum of those checks.
The result here is always the accuracy after the last epoch. AST's maximum is kept beside it as
max_acc_selected_on_test: it is chosen on the test set, so it is not a held-out estimate.

The networks are trained by training.py under training.step_schedule, one at a time or several
stacked (stack_groups picks; the same networks either way, up to float rounding).
"""
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from trajmatch.accel import FP32, Accel
from networks import get_network
from trajmatch.stacked import stackable
from trajmatch.training import SGDSettings, net_group, step_schedule, train_scheduled


@dataclass(frozen=True)
class EvalProtocol:
    """An evaluation schedule's SGD settings; its second phase starts with a fresh optimiser."""
    momentum: float
    weight_decay: float
    lr_factor: float            # lr of the second phase = lr_factor * lr
    momentum_after: float       # momentum of the second phase
    check_every: int | None     # test after every epoch ep % check_every == 0 (the maximum is reported)


LR_DECAYS = {  # --lr_decay values
    'mtt': EvalProtocol(momentum=0.9, weight_decay=5e-4, lr_factor=0.1, momentum_after=0.9, check_every=None),
    'ast': EvalProtocol(momentum=0.9, weight_decay=1e-3, lr_factor=0.5, momentum_after=0.8, check_every=20),
}
PARALLEL_EVAL = ('auto', 'loop', 'stack')  # how num_eval networks are trained; see stack_groups


def eval_schedule(lr_decay: str, lr: float, epochs: int) -> list[SGDSettings | None]:
    """The epochs 0..epochs that evaluate_synset trains (training.step_schedule: the optimiser built
    before each one, or None); the authors decay after training epoch epochs//2 + 1."""
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"unknown lr_decay {lr_decay!r}; expected one of {sorted(LR_DECAYS)}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    p = LR_DECAYS[lr_decay]
    return step_schedule(epochs + 1, SGDSettings(lr, p.momentum, p.weight_decay), change_after=epochs // 2 + 1,
                         lr_factor=p.lr_factor, momentum_after=p.momentum_after)


def check_epochs(lr_decay: str, epochs: int) -> list[int]:
    """The epochs after which a periodic check tests the networks (their maximum: max_selected_on_test)."""
    every = LR_DECAYS[lr_decay].check_every
    return [] if every is None else [ep for ep in range(epochs + 1) if ep % every == 0]


@dataclass(frozen=True)
class Scores:
    final: float                       # test accuracy after the last epoch: the result
    max_selected_on_test: float | None  # max over the periodic checks (ast); None without checks
    val: float | None = None           # validation accuracy after the last epoch (--valid); None without


@dataclass
class EvalResult:
    model: str
    accs: list[float] = field(default_factory=list)  # final-epoch test accuracy per network, in [0, 1]
    # --lr_decay ast only: per network, the maximum of the every-20-epochs test checks as AST's
    # code reports it. Selected on the test set: never the headline number.
    max_acc_selected_on_test: list[float] = field(default_factory=list)
    val_accs: list[float] = field(default_factory=list)  # final-epoch validation accuracy (--valid only)

    @property
    def mean(self) -> float:
        return sum(self.accs) / len(self.accs)

    @property
    def val_mean(self) -> float | None:
        return sum(self.val_accs) / len(self.val_accs) if self.val_accs else None

    @property
    def std(self) -> float:  # population std, as the MTT/AST tables report
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accs) / len(self.accs))

    def __str__(self) -> str:
        val = f"; validation {100 * self.val_mean:.2f} %" if self.val_accs else ''
        return f"{self.model}: {100 * self.mean:.2f} ± {100 * self.std:.2f} % (n={len(self.accs)}){val}"


DataShape = tuple[int, int, tuple[int, int]]  # (channel, num_classes, im_size), as networks.get_network


def fresh_network(model: str, data_shape: DataShape, seed: int, device: torch.device) -> torch.nn.Module:
    """Network `model` initialised from `seed`, without disturbing the caller's random stream."""
    channel, num_classes, im_size = data_shape
    if not isinstance(num_classes, int):
        raise TypeError(f"data_shape is (channel, num_classes, im_size), got {data_shape!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_network(model, channel, num_classes, im_size).to(device)


def train_and_score(model: str, data_shape: DataShape, images: torch.Tensor, labels: torch.Tensor,
                    test_images: torch.Tensor, test_labels: torch.Tensor, *, lr: float, epochs: int,
                    seeds: list[int], batch_size: int = 256, lr_decay: str = 'mtt', use_dsa: bool = True,
                    accel: Accel = FP32, val: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Scores]:
    """Train one fresh `model` per seed on (images, labels) by eval_schedule, all together
    (training.net_group: one plain network, or several stacked); test each, and score it on the
    validation images `val` too when given."""
    schedule, checks = eval_schedule(lr_decay, lr, epochs), check_epochs(lr_decay, epochs)
    group = net_group([fresh_network(model, data_shape, s, images.device) for s in seeds], accel)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    tested = {}
    for ep, _ in train_scheduled(group, images, labels, schedule, batch_size=batch_size, generators=gens,
                                 use_dsa=use_dsa, accel=accel):
        if ep in checks or ep == epochs:
            tested[ep] = group.accuracies(test_images, test_labels, accel=accel)
    val_accs = group.accuracies(*val, accel=accel) if val is not None else [None] * len(seeds)
    return [Scores(tested[epochs][k], max(tested[ep][k] for ep in checks) if checks else None, val_accs[k])
            for k in range(len(seeds))]


# Past about this many input pixels per step (K networks x batch x H x W) the stacked activations
# leave the CPU's caches and one network at a time is faster: measured on Digits (8x8) with 5
# ConvNetD2s, stacking won 1.65x at batch 10 and 1.54x at batch 20, lost 0.94x at 50, 0.77x at 100.
CPU_STACK_PIXELS = 128 * 8 * 8


def stack_groups(seeds: list[int], model: str, data_shape: DataShape, num_images: int, batch_size: int,
                 device: torch.device, parallel: str) -> list[list[int]]:
    """Split the seeds into groups trained together. parallel: 'loop' = one at a time, 'stack' = all
    at once, 'auto' = all at once on CUDA, on CPU as many as fit CPU_STACK_PIXELS per step. Models
    with BatchNorm running statistics always go one at a time (stacked.stackable)."""
    im_size = data_shape[2]
    if parallel == 'loop' or not stackable(fresh_network(model, data_shape, 0, torch.device('cpu'))):
        size = 1
    elif parallel == 'stack' or device.type == 'cuda':
        size = len(seeds)
    else:
        size = max(1, CPU_STACK_PIXELS // (min(batch_size, num_images) * im_size[0] * im_size[1]))
    return [seeds[i:i + size] for i in range(0, len(seeds), size)]


def evaluate_set(models: list[str], data_shape: DataShape, images: torch.Tensor, labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, *, lr: float, epochs: int,
                 num_eval: int, seed: int, lr_decay: str = 'mtt', progress: bool = True,
                 parallel: str = 'auto', batch_size: int = 256, accel: Accel = FP32,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[EvalResult]:
    """num_eval networks per architecture; network i is seeded with seed + i (same seeds across models).
    data_shape: (channel, num_classes, im_size). `parallel` (see stack_groups) changes only the speed,
    not the networks. With `val` (images, labels) each network is also scored on the validation set."""
    images, labels = images.detach(), labels.detach()
    kw = dict(lr=lr, epochs=epochs, batch_size=batch_size, lr_decay=lr_decay, accel=accel, val=val)
    results = []
    for model in models:
        res = EvalResult(model)
        groups = stack_groups([seed + i for i in range(num_eval)], model, data_shape, images.shape[0], batch_size,
                              images.device, parallel)
        for group in tqdm(groups, desc=f'eval {model}', leave=False, disable=not progress):
            got = train_and_score(model, data_shape, images, labels, test_images, test_labels, seeds=group, **kw)
            res.accs += [s.final for s in got]
            res.max_acc_selected_on_test += [s.max_selected_on_test for s in got
                                             if s.max_selected_on_test is not None]
            res.val_accs += [s.val for s in got if s.val is not None]
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
