"""Train expert networks on real data and save their parameter trajectories (MTT buffer format).

    python buffer.py --dataset Digits --num_experts 5 --train_epochs 20
Re-running skips experts already on disk; expert i is seeded from (--seed, i), so a resumed
batch of experts is the same as an uninterrupted one.

    torchrun --nproc_per_node=K buffer.py ...   # the experts still to train are split across K processes
Expert i is written to its own replay_buffer_{i}.pt whichever process trains it, so the files are
the same as one process would write. Training is training.py's: the --optim recipe is a
training.step_schedule, and --parallel_experts K trains K experts as one stacked group (the same experts).
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

from trajmatch.ast_components import GP_DEFAULT_MU, gradient_penalty, loss_decay_factor
from trajmatch.data import DATA_FLAG_DOMAINS, DEFAULT_MODEL, add_data_flags, check_dataset, load_dataset
from trajmatch.accel import FP32, Accel, accel_for, add_accel_flags
from trajmatch.distributed import barrier, broadcast_object, cleanup, init_distributed, shard
from networks import MODELS, get_network
from trajmatch.stacked import stackable
from trajmatch.trajectory_io import (avg_var, buffer_dir, expert_done, expert_epochs_on_disk, expert_path, load_trajectories,
                           meta_path, read_meta, save_expert, sidecar_of, snapshot, trajectory_tensor, write_meta)
from trajmatch.training import SGDSettings, accuracy, net_group, step_schedule, train_scheduled
from trajmatch.cli import (EPOCHS, MOMENTUM, NETWORKS, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, CliParser, UsageError,
                           check_flags, cli_entry)
from trajmatch.files import check_writable, remove_stray_temps
from trajmatch.runtime import pick_device, seed_everything, set_deterministic


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p, download=True)
    p.add_argument('--model', default=None, choices=list(MODELS), help='default: the dataset\'s ConvNet')
    p.add_argument('--num_experts', type=int, default=5)
    p.add_argument('--train_epochs', type=int, default=20, help='epochs per expert (E; E+1 snapshots)')
    p.add_argument('--lr_teacher', type=float, default=None,
                   help="expert learning rate (default: the --optim recipe's: sgd and sgdmom_paper 0.01, sgdmom_code and adam 0.003)")
    p.add_argument('--mom', type=float, default=0.0, help='expert SGD momentum (--optim sgd)')
    p.add_argument('--l2', type=float, default=0.0, help='expert weight decay (--optim sgd)')
    p.add_argument('--decay', action='store_true', help='lr x0.1 after epoch index E//2+1 (MTT)')
    # AST smooth experts (docs/method.md, section 1). The AST authors' spellings (--optim SGDMOM, a bare
    # --loss_decay, --gp True) mean what their final code does; the paper's versions are named values
    p.add_argument('--optim', default='sgd', type=optim_name, choices=list(OPTIMS), metavar='OPTIM',
                   help='sgd: MTT (--mom/--l2/--decay); sgdmom_code (also sgdmom, SGDMOM: the AST authors\' '
                        'spelling; the AST presets): momentum 0.9, wd 1e-3, lr 0.003, x0.6 after E//2+1; '
                        'sgdmom_paper: AST paper (momentum 0.9, lr x0.5 after E//2); adam (ADAM): the AST '
                        'authors\' Adam, wd 1e-3, lr 0.003, x0.6 after E//2+1. Choices: ' + ', '.join(OPTIMS))
    p.add_argument('--loss_decay', nargs='?', const='code', default=None, choices=['paper', 'code'],
                   help='scale CE by λ_e: code (bare --loss_decay, the authors\') 0.5..0.95 over 10 epochs; '
                        'paper 0.5->1 over 5')
    p.add_argument('--gp', nargs='?', const='code', default=None, type=_gp_variant, choices=['paper', 'code'],
                   help="gradient penalty on the clean batch: code (bare --gp or --gp True, the authors': per "
                        "pixel, μ=2) or paper (per-sample L2, μ=1)")
    p.add_argument('--gp_mu', type=float, default=None, help='penalty weight μ (default: the variant\'s)')
    p.add_argument('--gp_k', type=float, default=1.0, help='target input-gradient norm K')
    p.add_argument('--batch_train', type=int, default=256)
    p.add_argument('--dsa', default='True', choices=['True', 'False'], help='DSA augmentation while training')
    p.add_argument('--buffer_path', default='buffers')
    p.add_argument('--device', default='auto')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--parallel_experts', type=int, default=1,
                   help='train this many experts at once as one vectorised network (stacked.py); the same '
                        'experts either way. 1 (default) was faster on the CPU bench; worth trying on a GPU')
    add_accel_flags(p)
    return p


# name -> (optimiser, momentum, weight decay, default lr, lr factor, epoch index after which the lr changes).
# 'sgd' takes momentum, weight decay and the decay (x0.1 after E//2+1, only with --decay) from its flags; every
# other recipe changes its lr unconditionally, as the AST authors' buffer.py does. At the change the optimiser is
# rebuilt (momentum buffer / Adam moments reset), as MTT's and the AST authors' buffer.py do.
OPTIMS = {
    'sgd': ('sgd', None, None, 0.01, 0.1, 'half+1'),          # MTT
    'sgdmom_code': ('sgd', 0.9, 1e-3, 0.003, 0.6, 'half+1'),  # AST authors' buffer.py defaults (AST presets)
    'sgdmom_paper': ('sgd', 0.9, 0.0, 0.01, 0.5, 'half'),     # AST paper Sec. V-A: lr halved at epoch 25 of 50
    'adam': ('adam', None, 1e-3, 0.003, 0.6, 'half+1'),       # AST authors' --optim ADAM (their buffer.py:73-78)
}
# the AST authors' spellings (case is ignored) -> our names. 'sgdmom' meant the paper's recipe before issue 26:
# sidecars written then say 'sgdmom' and are read as 'sgdmom_paper' (LEGACY_SIDECAR)
OPTIM_ALIASES = {'sgdmom': 'sgdmom_code'}
LEGACY_SIDECAR = {'optim': {'sgdmom': 'sgdmom_paper'}}


def optim_name(value: str) -> str:
    """--optim as typed -> the recipe's name: case ignored, the authors' SGDMOM is sgdmom_code."""
    value = value.lower()
    return OPTIM_ALIASES.get(value, value)


def _gp_variant(value: str) -> str:
    return 'code' if value in ('True', 'true', '1') else value  # the AST README writes --gp True: their code


def expert_lr(optim: str, lr: float | None) -> float:
    """--lr_teacher, or the --optim recipe's default lr where it is unset."""
    return OPTIMS[optim_name(optim)][3] if lr is None else lr


def expert_schedule(optim: str, lr: float | None, mom: float, l2: float, decay: bool,
                    epochs: int) -> list[SGDSettings | None]:
    """The --optim recipe as training.step_schedule: per epoch, the SGD built before it (or None). lr None =
    the recipe's default."""
    optim = optim_name(optim)
    kind, momentum, wd, _, factor, when = OPTIMS[optim]
    if optim == 'sgd':
        momentum, wd = mom, l2
    change_after = epochs // 2 if when == 'half' else epochs // 2 + 1
    if optim == 'sgd' and not decay:
        change_after = None
    momentum = 0.0 if momentum is None else momentum  # Adam: unused
    return step_schedule(epochs, SGDSettings(expert_lr(optim, lr), momentum, wd, kind), change_after=change_after,
                         lr_factor=factor, momentum_after=momentum)


RECIPE = ('valid', 'optim', 'loss_decay', 'gp', 'gp_mu', 'gp_k', 'train_epochs', 'lr_teacher', 'mom', 'l2', 'decay',
          'batch_train', 'dsa', 'seed')


def recipe_clash(folder: str, done: list[int], args: dict) -> str | None:
    """Experts on disk trained another way would be silently mixed in: say so instead."""
    for i in done:
        saved = (sidecar_of(folder, i) or {}).get('args')
        if not isinstance(saved, dict):
            continue  # no readable record of how it was trained; check_experts_on_disk checks the file itself
        saved = {k: LEGACY_SIDECAR.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in saved.items()}
        diff = [k for k in RECIPE if k in saved and saved[k] != args.get(k)]
        if diff:
            return (f"expert {i} in {folder} was trained with other settings ({', '.join(diff)}); "
                    f"use another --buffer_path or the same flags")
    return None


def expert_seed(seed: int, index: int) -> int:
    return seed * 100_003 + index


def expert_network(model: str, data, seed: int, device: torch.device) -> torch.nn.Module:
    """Expert `seed`'s initial network. It reseeds the global RNG, as buffer.py always has, so existing
    expert buffers stay reproducible."""
    torch.manual_seed(seed)
    return get_network(model, data.channel, data.num_classes, data.im_size).to(device)


def train_experts(args, data, device, indices: list[int], progress: bool = True,
                  accel: Accel = FP32) -> list[tuple[list, dict]]:
    """Experts `indices`, trained together (one: a plain network; several: stacked.NetStack,
    --parallel_experts): snapshots at init and after every epoch, plus metadata. Each expert keeps its
    own seed, data order, augmentations and momentum, so the files are the same either way."""
    seeds = [expert_seed(args.seed, i) for i in indices]
    group = net_group([expert_network(args.model, data, s, device) for s in seeds], accel)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    schedule = expert_schedule(args.optim, args.lr_teacher, args.mom, args.l2, args.decay, args.train_epochs)
    gp = None
    if args.gp:  # K = 1 only (check_parallel_experts)
        mu = args.gp_mu if args.gp_mu is not None else GP_DEFAULT_MU[args.gp]
        gp = lambda model, x: gradient_penalty(model, x, mu=mu, K=args.gp_k, variant=args.gp)
    scale = (lambda epoch: loss_decay_factor(epoch, args.loss_decay)) if args.loss_decay else None
    x_train, y_train = data.images_train.to(device), data.labels_train.to(device)
    x_test, y_test = data.images_test.to(device), data.labels_test.to(device)
    trajectories, test_accs = [[snapshot(group.network(k))] for k in range(group.k)], [[] for _ in indices]
    epochs = train_scheduled(group, x_train, y_train, schedule, loss_scale=scale, batch_size=args.batch_train,
                             generators=gens, use_dsa=args.dsa == 'True', extra_loss=gp, accel=accel)
    name = f'expert {indices[0]}' if len(indices) == 1 else f'experts {indices[0]}-{indices[-1]}'
    bar = tqdm(epochs, total=len(schedule), desc=name, leave=False, disable=not progress)
    for _, (losses, train_accs) in bar:
        for k, acc in enumerate(group.accuracies(x_test, y_test, accel=accel)):
            test_accs[k].append(acc)
            trajectories[k].append(snapshot(group.network(k)))
        bar.set_postfix(loss=f'{losses.mean():.3f}', train=f'{train_accs.mean():.3f}',
                        test=f'{sum(a[-1] for a in test_accs) / len(indices):.3f}')
    return [(traj, expert_meta(args, i, traj, accs)) for i, traj, accs in zip(indices, trajectories, test_accs)]


def expert_meta(args, index: int, trajectory: list, test_accs: list[float] | None) -> dict:
    return {'dataset': args.dataset, 'model': args.model, 'zca': args.zca, 'valid': args.valid, 'index': index,
            'seed': expert_seed(args.seed, index),
            'subset': args.subset if args.dataset == 'ImageNet' else None,
            'res': args.res if args.dataset == 'ImageNet' else None,
            'format': 'mtt: list of trajectories; trajectory = list of E+1 snapshots; snapshot = list of tensors',
            'num_snapshots': len(trajectory), 'test_acc': test_accs[-1] if test_accs else None,
            'test_acc_per_epoch': test_accs, 'avg_var': avg_var(trajectory_tensor(trajectory)), 'args': vars(args)}


# flag -> allowed values; checked before anything is read or trained
FLAG_DOMAINS = {
    'num_experts': NETWORKS, 'train_epochs': EPOCHS, 'mom': MOMENTUM,
    'lr_teacher': POSITIVE.or_none("the --optim recipe's default"),
    'l2': NON_NEGATIVE, 'gp_mu': NON_NEGATIVE.or_none("the variant's default"), 'gp_k': NON_NEGATIVE,
    'batch_train': POSITIVE_INT, 'seed': SEED, 'parallel_experts': POSITIVE_INT, **DATA_FLAG_DOMAINS,
}


def snapshot_accuracies(args, data, trajectory: list, device: torch.device) -> list[float] | None:
    """Test accuracy after every epoch, recomputed from the stored snapshots; None for networks with
    BatchNorm running statistics, which the snapshots do not hold."""
    net = get_network(args.model, data.channel, data.num_classes, data.im_size).to(device)
    if not stackable(net):  # BatchNorm running statistics are not in the snapshots
        return None
    x_test, y_test = data.images_test.to(device), data.labels_test.to(device)
    accs = []
    for snap in trajectory[1:]:
        with torch.no_grad():
            for p, t in zip(net.parameters(), snap):
                p.copy_(t)
        accs.append(accuracy(net, x_test, y_test))
    return accs


def check_experts_on_disk(args, data, folder: str, indices: list[int], param_shapes: list,
                          device: torch.device) -> list[int]:
    """Experts already on disk must be ones this run can keep (readable, this dataset/model/zca, the
    shapes of --model, --train_epochs long). A sidecar that an interrupted write left missing or garbage is
    rewritten from the .pt. Returns the indices whose sidecar was rewritten."""
    rebuilt = []
    for i in indices:
        path, meta = expert_path(folder, i), sidecar_of(folder, i)
        epochs = expert_epochs_on_disk(path, meta, dataset=args.dataset, model=args.model,
                                       param_shapes=param_shapes, zca=args.zca)
        if epochs != args.train_epochs:
            raise UsageError(f"{path} holds {epochs} epochs, this run trains --train_epochs {args.train_epochs}; "
                             f"use another --buffer_path or the same --train_epochs")
        if meta is None:
            trajectory = load_trajectories(path)[0]
            meta = expert_meta(args, i, trajectory, snapshot_accuracies(args, data, trajectory, device))
            write_meta(folder, i, trajectory, {**meta, 'sidecar_rebuilt': True})
            rebuilt.append(i)
    return rebuilt


def check_parallel_experts(parallel: int, *, gp: bool, model: str, net: torch.nn.Module, optim: str = 'sgd') -> None:
    """--parallel_experts must be >= 1, and > 1 only for what stacked.py can train (net: one `model`)."""
    if parallel < 1:
        raise UsageError(f"--parallel_experts {parallel}: give 1 or more")
    if parallel > 1 and gp:
        raise UsageError("--gp is not vectorised (it differentiates an input gradient); use --parallel_experts 1")
    if parallel > 1 and OPTIMS[optim][0] != 'sgd':
        raise UsageError(f"--optim {optim} is not vectorised (stacked experts train with SGD); use --parallel_experts 1")
    if parallel > 1 and not stackable(net):
        raise UsageError(f"{model} has BatchNorm running statistics, which cannot be stacked; "
                         f"use --parallel_experts 1")


def mean_avg_var(folder: str, indices: list[int]) -> float | None:
    """Mean Avg_Var of experts from their JSON sidecars (under torchrun other processes trained some)."""
    values = [meta['avg_var'] for i in indices if (meta := read_meta(folder, i)) and 'avg_var' in meta]
    return sum(values) / len(values) if values else None


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    args.model = args.model or DEFAULT_MODEL[args.dataset]
    args.lr_teacher = expert_lr(args.optim, args.lr_teacher)  # recorded in the sidecars as trained
    # every check that can fail runs before any training, and before anything is written
    check_flags(args, FLAG_DOMAINS)
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    folder = buffer_dir(args.buffer_path, args.dataset, args.model, zca=args.zca, subset=args.subset, res=args.res)
    check_writable(folder, 'buffer folder')
    if not args.download:
        check_dataset(args.dataset, args.data_path, subset=args.subset)
    seed_everything(args.seed)
    data = load_dataset(args.dataset, args.data_path, zca=args.zca, subset=args.subset, res=args.res, valid=args.valid,
                        download=args.download)
    try:
        net = get_network(args.model, data.channel, data.num_classes, data.im_size)  # fail early on a bad size
    except ValueError as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    check_parallel_experts(args.parallel_experts, gp=bool(args.gp), model=args.model, net=net, optim=args.optim)
    d, device = init_distributed(device)
    if d.is_main:  # before the listing is shared: no other rank writes yet
        remove_stray_temps(folder)
        on_disk = [i for i in range(args.num_experts) if expert_done(folder, i)]
        clash = recipe_clash(folder, on_disk, vars(args))
        if clash:
            raise UsageError(clash)
        for i in check_experts_on_disk(args, data, folder, on_disk, [p.shape for p in net.parameters()], device):
            print(f"expert {i}: sidecar {os.path.basename(meta_path(folder, i))} was missing or unreadable; "
                  f"rewritten from its .pt")
    # rank 0's listing for all: a fast rank could otherwise save an expert before a slow one lists the folder
    todo = broadcast_object([i for i in range(args.num_experts) if not expert_done(folder, i)])
    if d.is_main:
        print(f"{folder}: {args.num_experts - len(todo)} experts on disk, training {len(todo)}"
              + (f" on {d.world_size} processes" if d.world_size > 1 else ''))
    mine = shard(todo, d.rank, d.world_size)
    accel = accel_for(device, channels_last=args.channels_last, bf16=args.bf16, tf32=args.tf32)
    groups = [mine[j:j + args.parallel_experts] for j in range(0, len(mine), args.parallel_experts)]
    for group in tqdm(groups, desc='experts', disable=not d.is_main):
        start = time.time()
        done = train_experts(args, data, device, group, progress=d.is_main, accel=accel)
        for i, (trajectory, meta) in zip(group, done):
            meta['seconds'] = (time.time() - start) / len(group)
            save_expert(folder, i, trajectory, meta)
            tqdm.write(f"expert {i}: test acc {100 * meta['test_acc']:.2f}%  Avg_Var {meta['avg_var']:.4g}  "
                       f"({meta['seconds']:.1f}s)")
    barrier()  # every rank's experts are on disk before rank 0 reads their sidecars
    mean = mean_avg_var(folder, todo) if d.is_main else None
    if mean is not None:
        print(f"mean Avg_Var (trajectory smoothness, lower is smoother) over {len(todo)} new experts: {mean:.4g}")
    cleanup()


if __name__ == '__main__':
    main()
