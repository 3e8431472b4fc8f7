"""Score a distilled set, or a baseline, by training fresh networks on it (SPEC 9).

    python eval.py --run runs/000-Digits-ipc10-ConvNetD2 --eval_mode ConvNetD2 AlexNet --num_eval 5
    python eval.py --baseline random --dataset Digits --ipc 10
    python eval.py --baseline full --dataset Digits --epoch_eval_train 300
Prints a mean ± std table and writes JSON (--out).
"""
import argparse
import os

import torch

from accel import accel_from_args, add_accel_flags
from data import DATASETS, DEFAULT_MODEL, SUBSETS, DataError, load_dataset
from evaluation import LR_DECAYS, PARALLEL_EVAL, evaluate_set, markdown_table, random_real
from networks import MODELS, get_network
from runlog import latest_run_dir, load_args
from utils import UsageError, atomic_write_json, fail, pick_device, seed_everything


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--run', help="a distill.py run folder, or 'latest' in --run_dir (uses images_best.pt, labels_best.pt, lr_best.pt)")
    src.add_argument('--images', help='a tensor file of synthetic images (with --labels and --lr)')
    src.add_argument('--baseline', choices=['random', 'full'], help='random real images per class, or the full train set')
    a('--labels', help='labels tensor file for --images')
    a('--run_dir', default='runs', help="where --run latest looks")
    a('--dataset', default='Digits', choices=DATASETS, help='ignored with --run (taken from its args.json)')
    a('--subset', default='imagenette', choices=list(SUBSETS))
    a('--res', type=int, default=128)
    a('--zca', action='store_true')
    a('--data_path', default='data')
    a('--ipc', type=int, default=1, help='images per class for --baseline random')
    a('--lr', type=float, default=None, help='training lr (default: the learned lr of --run, else 0.01)')
    a('--eval_mode', nargs='+', default=None, choices=list(MODELS), help="architectures (default: the dataset's ConvNet)")
    a('--num_eval', type=int, default=5, help='networks per architecture')
    a('--epoch_eval_train', type=int, default=1000)
    a('--lr_decay', default='mtt', choices=list(LR_DECAYS))
    a('--parallel_eval', default='auto', choices=PARALLEL_EVAL,
      help='stack: train the networks together (vmap); loop: one at a time; auto: stack on CUDA, on CPU '
           'while the stacked batch stays small (same networks either way)')
    a('--seed', type=int, default=0, help='network i uses seed + i; also picks the random baseline images')
    a('--device', default='auto')
    a('--out', default=None, help='JSON output (default: <run>/eval.json or eval_<source>.json)')
    add_accel_flags(p)
    return p


def load_source(args, device):
    """Returns (data, images, labels, lr, name) for whichever source was asked for."""
    if args.run == 'latest':
        args.run = latest_run_dir(args.run_dir)
        if args.run is None:
            raise UsageError(f"--run latest: no run folders in {args.run_dir}; run distill.py first")
    if args.run:
        run_args = load_args(args.run)
        for key in ('dataset', 'subset', 'res', 'zca'):
            setattr(args, key, run_args[key])
        paths = [os.path.join(args.run, f) for f in ('images_best.pt', 'labels_best.pt', 'lr_best.pt')]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise UsageError(f"{missing[0]} not found; the run has not evaluated yet (see --eval_it) or is not a distill.py run")
        images, labels, lr = (torch.load(p, map_location='cpu', weights_only=True) for p in paths)
        args.eval_mode = args.eval_mode or [run_args['model']]
        lr = args.lr if args.lr is not None else float(lr)
        data = load_dataset(args.dataset, args.data_path, zca=args.zca, subset=args.subset, res=args.res)
        return data, images, labels, lr, os.path.basename(os.path.normpath(args.run))
    data = load_dataset(args.dataset, args.data_path, zca=args.zca, subset=args.subset, res=args.res)
    lr = args.lr if args.lr is not None else 0.01
    if args.images:
        if not args.labels:
            raise UsageError('--images needs --labels (and usually --lr)')
        images = torch.load(args.images, map_location='cpu', weights_only=True)
        labels = torch.load(args.labels, map_location='cpu', weights_only=True)
        return data, images, labels, lr, os.path.basename(args.images)
    if args.baseline == 'full':
        return data, data.images_train, data.labels_train, lr, 'full'
    images, labels = random_real(data, args.ipc, torch.Generator().manual_seed(args.seed))
    return data, images, labels, lr, f'random_ipc{args.ipc}'


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        device = pick_device(args.device)
        data, images, labels, lr, name = load_source(args, device)
        args.eval_mode = args.eval_mode or [DEFAULT_MODEL[args.dataset]]
        for m in args.eval_mode:
            get_network(m, data.channel, data.num_classes, data.im_size)
        if tuple(images.shape[1:]) != (data.channel, *data.im_size):
            raise UsageError(f"images of shape {tuple(images.shape[1:])} do not match {args.dataset} "
                             f"({data.channel}x{data.im_size[0]}x{data.im_size[1]}); check --dataset/--zca")
    except (DataError, UsageError, ValueError) as e:
        fail(str(e))
    seed_everything(args.seed)
    results = evaluate_set(args.eval_mode, (data.channel, data.im_size, data.num_classes), images.to(device),
                           labels.to(device), data.images_test.to(device), data.labels_test.to(device), lr=lr,
                           epochs=args.epoch_eval_train, num_eval=args.num_eval, seed=args.seed, lr_decay=args.lr_decay,
                           parallel=args.parallel_eval, accel=accel_from_args(args, device))
    print(markdown_table(results, f'{name} ({args.dataset}, lr {lr:.4g})'))
    out = args.out or (os.path.join(args.run, 'eval.json') if args.run else f'eval_{name}.json')
    atomic_write_json({'source': name, 'dataset': args.dataset, 'lr': lr, 'epochs': args.epoch_eval_train,
                       'num_images': int(images.shape[0]),
                       'results': {r.model: {'accs': r.accs, 'mean': r.mean, 'std': r.std} for r in results}}, out)
    print(f"wrote {out}")
    return results


if __name__ == '__main__':
    main()
