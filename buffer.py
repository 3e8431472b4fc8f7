"""Train expert networks on real data and save their parameter trajectories (MTT buffer format).

    python buffer.py --dataset Digits --num_experts 5 --train_epochs 20
Re-running skips experts already on disk; expert i is seeded from (--seed, i), so a resumed
batch of experts is the same as an uninterrupted one.
"""
import argparse
import time

import torch
from tqdm import tqdm

from ast_components import GP_DEFAULT_MU, gradient_penalty, loss_decay_factor
from data import DATASETS, DEFAULT_MODEL, SUBSETS, DataError, check_dataset, load_dataset
from networks import MODELS, get_network
from trajectory_io import avg_var, buffer_dir, expert_done, read_meta, save_expert, snapshot, trajectory_tensor
from training import accuracy, train_epoch
from utils import UsageError, fail, pick_device, seed_everything


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default='Digits', choices=DATASETS)
    p.add_argument('--subset', default='imagenette', choices=list(SUBSETS), help='ImageNet subset')
    p.add_argument('--res', type=int, default=128, help='ImageNet subset resolution (pixels)')
    p.add_argument('--model', default=None, choices=list(MODELS), help='default: the dataset\'s ConvNet')
    p.add_argument('--num_experts', type=int, default=5)
    p.add_argument('--train_epochs', type=int, default=20, help='epochs per expert (E; E+1 snapshots)')
    p.add_argument('--lr_teacher', type=float, default=0.01, help='expert SGD learning rate')
    p.add_argument('--mom', type=float, default=0.0, help='expert SGD momentum (--optim sgd)')
    p.add_argument('--l2', type=float, default=0.0, help='expert weight decay (--optim sgd)')
    p.add_argument('--decay', action='store_true', help='lr x0.1 after epoch index E//2+1 (MTT)')
    # AST smooth experts (SPEC 4): paper values by default, the authors' code as the 'code' variant
    p.add_argument('--optim', default='sgd', type=str.lower, choices=list(OPTIMS),
                   help='sgd: MTT (--mom/--l2/--decay); sgdmom: AST paper (momentum 0.9, lr x0.5 at E//2); '
                        'sgdmom_code: AST code (momentum 0.9, wd 1e-3, lr 0.003, x0.6 at E//2+1)')
    p.add_argument('--loss_decay', nargs='?', const='paper', default=None, choices=['paper', 'code'],
                   help='scale CE by λ_e: paper 0.5->1 over 5 epochs; code 0.5..0.95 over 10')
    p.add_argument('--gp', nargs='?', const='paper', default=None, type=_gp_variant, choices=['paper', 'code'],
                   help="gradient penalty on the clean batch: paper (per-sample L2, μ=1) or code (per pixel, μ=2)")
    p.add_argument('--gp_mu', type=float, default=None, help='penalty weight μ (default: the variant\'s)')
    p.add_argument('--gp_k', type=float, default=1.0, help='target input-gradient norm K')
    p.add_argument('--batch_train', type=int, default=256)
    p.add_argument('--dsa', default='True', choices=['True', 'False'], help='DSA augmentation while training')
    p.add_argument('--zca', action='store_true')
    p.add_argument('--data_path', default='data')
    p.add_argument('--download', action='store_true', help='download torchvision datasets if missing')
    p.add_argument('--buffer_path', default='buffers')
    p.add_argument('--device', default='auto')
    p.add_argument('--seed', type=int, default=0)
    return p


# name -> (momentum, weight decay, lr override or None, lr factor, epoch index of the decay or None = --decay rule)
OPTIMS = {'sgd': None, 'sgdmom': (0.9, 0.0, None, 0.5, 'half'), 'sgdmom_code': (0.9, 1e-3, 0.003, 0.6, 'half+1')}


def _gp_variant(value: str) -> str:
    return 'paper' if value in ('True', 'true', '1') else value  # the AST README writes --gp True


def expert_optimizer(params, optim: str, lr: float, mom: float, l2: float, decay: bool, epochs: int):
    """(optimizer, epoch index after which lr is multiplied, factor); index None = never."""
    if optim == 'sgd':
        return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=l2), (epochs // 2 + 1 if decay else None), 0.1
    momentum, wd, lr_fixed, factor, when = OPTIMS[optim]
    at = epochs // 2 if when == 'half' else epochs // 2 + 1
    return torch.optim.SGD(params, lr=lr_fixed or lr, momentum=momentum, weight_decay=wd), at, factor


RECIPE = ('optim', 'loss_decay', 'gp', 'gp_mu', 'gp_k', 'train_epochs', 'lr_teacher', 'mom', 'l2', 'decay',
          'batch_train', 'dsa', 'seed')


def recipe_clash(folder: str, done: list[int], args: dict) -> str | None:
    """Experts on disk trained another way would be silently mixed in: say so instead."""
    for i in done:
        saved = (read_meta(folder, i) or {}).get('args', {})
        diff = [k for k in RECIPE if k in saved and saved[k] != args.get(k)]
        if diff:
            return (f"expert {i} in {folder} was trained with other settings ({', '.join(diff)}); "
                    f"use another --buffer_path or the same flags")
    return None


def expert_seed(seed: int, index: int) -> int:
    return seed * 100_003 + index


def train_expert(args, data, device, index: int) -> tuple[list, dict]:
    """One expert: snapshots at init and after every epoch, plus its metadata."""
    seed = expert_seed(args.seed, index)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = get_network(args.model, data.channel, data.num_classes, data.im_size).to(device)
    opt, decay_at, decay_factor = expert_optimizer(net.parameters(), args.optim, args.lr_teacher, args.mom, args.l2,
                                                   args.decay, args.train_epochs)
    gp = None
    if args.gp:
        mu = args.gp_mu if args.gp_mu is not None else GP_DEFAULT_MU[args.gp]
        gp = lambda model, x: gradient_penalty(model, x, mu=mu, K=args.gp_k, variant=args.gp)
    x_train, y_train = data.images_train.to(device), data.labels_train.to(device)
    x_test, y_test = data.images_test.to(device), data.labels_test.to(device)
    trajectory, test_accs = [snapshot(net)], []
    bar = tqdm(range(args.train_epochs), desc=f'expert {index}', leave=False)
    for epoch in bar:
        scale = loss_decay_factor(epoch, args.loss_decay) if args.loss_decay else 1.0
        loss, train_acc = train_epoch(net, x_train, y_train, opt, batch_size=args.batch_train, generator=gen,
                                      use_dsa=args.dsa == 'True', loss_scale=scale, extra_loss=gp)
        test_accs.append(accuracy(net, x_test, y_test))
        trajectory.append(snapshot(net))
        bar.set_postfix(loss=f'{loss:.3f}', train=f'{train_acc:.3f}', test=f'{test_accs[-1]:.3f}')
        if epoch == decay_at:  # MTT's schedule: after epoch index E//2+1
            for group in opt.param_groups:
                group['lr'] *= decay_factor
    meta = {'dataset': args.dataset, 'model': args.model, 'zca': args.zca, 'index': index, 'seed': seed,
            'subset': args.subset if args.dataset == 'ImageNet' else None,
            'res': args.res if args.dataset == 'ImageNet' else None,
            'format': 'mtt: list of trajectories; trajectory = list of E+1 snapshots; snapshot = list of tensors',
            'num_snapshots': len(trajectory), 'test_acc': test_accs[-1], 'test_acc_per_epoch': test_accs,
            'avg_var': avg_var(trajectory_tensor(trajectory)), 'args': vars(args)}
    return trajectory, meta


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.model = args.model or DEFAULT_MODEL[args.dataset]
    try:
        if not args.download:
            check_dataset(args.dataset, args.data_path, subset=args.subset)
        device = pick_device(args.device)
        seed_everything(args.seed)
        data = load_dataset(args.dataset, args.data_path, zca=args.zca, subset=args.subset, res=args.res,
                            download=args.download)
        get_network(args.model, data.channel, data.num_classes, data.im_size)  # fail early on a bad size
    except (DataError, UsageError, ValueError) as e:
        fail(str(e))
    folder = buffer_dir(args.buffer_path, args.dataset, args.model, zca=args.zca, subset=args.subset, res=args.res)
    todo = [i for i in range(args.num_experts) if not expert_done(folder, i)]
    clash = recipe_clash(folder, [i for i in range(args.num_experts) if i not in todo], vars(args))
    if clash:
        fail(clash)
    print(f"{folder}: {args.num_experts - len(todo)} experts on disk, training {len(todo)}")
    avg_vars = []
    for i in tqdm(todo, desc='experts'):
        start = time.time()
        trajectory, meta = train_expert(args, data, device, i)
        meta['seconds'] = time.time() - start
        save_expert(folder, i, trajectory, meta)
        tqdm.write(f"expert {i}: test acc {100 * meta['test_acc']:.2f}%  Avg_Var {meta['avg_var']:.4g}  "
                   f"({meta['seconds']:.1f}s)")
        avg_vars.append(meta['avg_var'])
    if avg_vars:
        print(f"mean Avg_Var (trajectory smoothness, lower is smoother) over {len(avg_vars)} new experts: "
              f"{sum(avg_vars) / len(avg_vars):.4g}")


if __name__ == '__main__':
    main()
