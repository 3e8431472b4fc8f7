"""Score a distilled set, or a baseline, by training fresh networks on it (docs/method.md, section 3).

    python eval.py --run runs/000-Digits-ipc10-ConvNetD2 --eval_mode ConvNetD2 AlexNet --num_eval 5
    python eval.py --run latest --which best   # the set MTT reports: best evaluation, selected on the test set
    python eval.py --baseline random --dataset Digits --ipc 10
    python eval.py --baseline full --dataset Digits --epoch_eval_train 300
Prints a mean ± std table and writes JSON (--out).
"""
import argparse
import math
import os

import torch

from trajmatch.accel import accel_for, add_accel_flags
from trajmatch.data import DATA_FLAG_DOMAINS, DEFAULT_MODEL, add_data_flags, load_dataset
from trajmatch.evaluation import LR_DECAYS, PARALLEL_EVAL, evaluate_set, markdown_table, random_real
from networks import MODELS, get_network
from trajmatch.runlog import ARGS_FILE, BEST_FILES, EVAL_FILE, FINAL_FILES, latest_run_dir, load_args, run_file
from trajmatch.cli import (EPOCHS, NETWORKS, POSITIVE, POSITIVE_INT, SEED, CliParser, UsageError, check_flags,
                           check_saved_flags, cli_entry)
from trajmatch.files import atomic_write_json, check_writable, remove_stray_temps
from trajmatch.runtime import pick_device, seed_everything, set_deterministic


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--run', help="a distill.py run folder, or 'latest' in --run_dir: scores its final set "
                                   "(images_final.pt, labels_final.pt, lr_final.pt), or with --which best its best")
    src.add_argument('--images', help='a tensor file of synthetic images (with --labels and --lr)')
    src.add_argument('--baseline', choices=['random', 'full'], help='random real images per class, or the full train set')
    a('--labels', help='labels tensor file for --images')
    a('--which', default='final', choices=list(RUN_SETS),
      help="--run's set: final (after the last iteration; the headline) or best (images_best.pt: the best "
           "in-loop evaluation, selected on the test set, MTT's statistic, or on the validation split if the "
           "run had --valid N)")
    a('--run_dir', default='runs', help="where --run latest looks, and baselines write by default")
    add_data_flags(p)  # --dataset/--subset/--res/--zca/--valid are taken from the run's args.json with --run
    a('--ipc', type=int, default=1, help='images per class for --baseline random')
    a('--lr', type=float, default=None, help='training lr (default: the learned lr of --run, else 0.01)')
    a('--eval_mode', nargs='+', default=None, choices=list(MODELS), help="architectures (default: the dataset's ConvNet)")
    a('--num_eval', type=int, default=5, help='networks per architecture')
    a('--epoch_eval_train', type=int, default=1000,
      help="E: each network trains E+1 epochs, as the authors' evaluate_synset")
    a('--lr_decay', default='mtt', choices=list(LR_DECAYS),
      help="mtt: MTT's evaluate_synset; ast: the AST authors' (also reports their max over every-20-epoch "
           "checks, labelled as selected on the test set)")
    a('--parallel_eval', default='auto', choices=PARALLEL_EVAL,
      help='stack: train the networks together (vmap); loop: one at a time; auto: stack on CUDA, on CPU '
           'while the stacked batch stays small (same networks either way)')
    a('--seed', type=int, default=0, help='network i uses seed + i; also picks the random baseline images')
    a('--device', default='auto')
    a('--out', default=None, help='JSON output (default: <run>/eval.json, or <run_dir>/baselines/eval_<source>.json for a baseline)')
    add_accel_flags(p)
    return p


# flag -> allowed values; checked before anything is read or trained
FLAG_DOMAINS = {'ipc': POSITIVE_INT, 'lr': POSITIVE.or_none("the run's learned lr, else 0.01"),
                'num_eval': NETWORKS, 'epoch_eval_train': EPOCHS, 'seed': SEED,
                **DATA_FLAG_DOMAINS}
RUN_SETS = {'final': FINAL_FILES, 'best': BEST_FILES}  # --which -> the run's three files


def result_bytes(args) -> int:
    """More than the JSON result can take: 64 KiB, and 1 KiB per network (accuracies, validation, maxima)."""
    return 65536 + 1024 * args.num_eval * len(args.eval_mode or [None])


def load_tensor(path: str, what: str) -> torch.Tensor:
    """One tensor file, read with weights_only (no code runs from it); any failure is one UsageError line."""
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} not found")
    try:
        x = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle weights_only refuses
        raise UsageError(f"cannot read {what} {path} ({type(e).__name__}): not a tensor file saved by torch.save, "
                         f"or corrupt; only plain tensors are read") from None
    if not torch.is_tensor(x):
        raise UsageError(f"{what} {path} holds a {type(x).__name__}, not a tensor")
    return x


def check_set(images: torch.Tensor, labels: torch.Tensor, lr: float, names: tuple[str, str]) -> None:
    """The parts of a synthetic set that can be checked without the dataset."""
    if images.dim() != 4 or not images.is_floating_point() or images.shape[0] == 0:
        raise UsageError(f"{names[0]}: expected a float tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise UsageError(f"{names[0]} holds NaN or infinite pixels; the run diverged, pick another file")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or len(labels) != len(images):
        raise UsageError(f"{names[1]}: expected {len(images)} integer labels, got {labels.dtype} {tuple(labels.shape)}")
    if not (math.isfinite(lr) and lr > 0):
        where = f"--lr or {names[2]}" if len(names) > 2 else '--lr'
        raise UsageError(f"learning rate {lr} (from {where}) must be a finite number > 0; give --lr")


def read_run(args) -> tuple[torch.Tensor, torch.Tensor, float]:
    """--run: the run's flags (into args), images, labels and lr; everything is checked, nothing trained."""
    files = RUN_SETS[args.which]
    if args.run == 'latest':
        args.run = latest_run_dir(args.run_dir, holding=files[0])
        if args.run is None:
            raise UsageError(f"--run latest: no run folder in {args.run_dir} holds {files[0]}; run distill.py first "
                             f"(it saves the best set at each evaluation and the final set when it finishes)")
    if not os.path.isdir(args.run):
        raise UsageError(f"--run {args.run}: no such folder; give a distill.py run folder or 'latest'")
    run_args = load_args(args.run)
    source = run_file(args.run, ARGS_FILE)
    missing = [k for k in ('dataset', 'model') if k not in run_args]
    if missing:
        raise UsageError(f"{source} lacks '{missing[0]}'; it was edited or is corrupt (restore it)")
    check_saved_flags(build_parser(), run_args, source, keys=('dataset', 'subset', 'res', 'zca', 'valid'))
    if run_args['model'] not in MODELS:
        raise UsageError(f"{source}: model = {run_args['model']!r} is not a known architecture")
    for key in ('dataset', 'subset', 'res', 'zca', 'valid'):
        if key in run_args:
            setattr(args, key, run_args[key])
    args.eval_mode = args.eval_mode or [run_args['model']]
    args.run_valid = run_args.get('valid', 0)
    paths = [os.path.join(args.run, f) for f in files]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        why = ("the run has not finished (or finished before final sets were saved: give --which best)"
               if args.which == 'final' else "the run has not evaluated yet (see --eval_it)")
        raise UsageError(f"{missing[0]} not found; {why}, or it is not a distill.py run")
    images, labels, lr = (load_tensor(p, 'run file') for p in paths)
    if lr.numel() != 1 or not lr.is_floating_point():
        raise UsageError(f"{paths[2]}: expected one learning rate, got {lr.dtype} {tuple(lr.shape)}")
    return images, labels, args.lr if args.lr is not None else float(lr)


def run_set_name(args) -> str:
    """How --run's set is named in the table and the JSON: which set, and for best what it was selected on."""
    run = os.path.basename(os.path.normpath(args.run))
    if args.which == 'final':
        return f'{run} final set'
    on = 'the validation split' if args.run_valid else "the test set: MTT's statistic"
    return f'{run} best set (selected on {on})'


def read_set(args) -> tuple[tuple | None, str]:
    """The tensor files of --run or --images, checked as far as possible without the dataset, and the
    source's name; (None, name) for a baseline."""
    if args.labels and not args.images:
        raise UsageError('--labels goes with --images')
    if args.baseline:
        return None, 'full' if args.baseline == 'full' else f'random_ipc{args.ipc}'
    if args.run:
        images, labels, lr = read_run(args)
        name, files = run_set_name(args), [os.path.join(args.run, f) for f in RUN_SETS[args.which]]
    else:
        if not args.labels:
            raise UsageError('--images needs --labels (and usually --lr)')
        images, labels = load_tensor(args.images, '--images'), load_tensor(args.labels, '--labels')
        lr, name, files = (args.lr if args.lr is not None else 0.01), os.path.basename(args.images), [args.images, args.labels]
    check_set(images, labels, lr, files)
    return (images, labels, lr, files), name


def source_on(data, args, loaded) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(images, labels, lr) on the loaded dataset: a checked set, or a baseline drawn from it."""
    if loaded is not None:
        images, labels, lr, files = loaded
        if tuple(images.shape[1:]) != (data.channel, *data.im_size):
            raise UsageError(f"{files[0]}: images of shape {tuple(images.shape[1:])} do not match {args.dataset} "
                             f"({data.channel}x{data.im_size[0]}x{data.im_size[1]}); check --dataset/--zca")
        if int(labels.min()) < 0 or int(labels.max()) >= data.num_classes:
            raise UsageError(f"{files[1]}: labels must lie in 0..{data.num_classes - 1} for {args.dataset}")
        return images.float(), labels.long(), lr
    lr = args.lr if args.lr is not None else 0.01
    if args.baseline == 'full':
        return data.images_train, data.labels_train, lr
    data.check_ipc(args.ipc)
    images, labels = random_real(data, args.ipc, torch.Generator().manual_seed(args.seed))
    return images, labels, lr


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    # every check that can fail runs before any training; the output folder's before the dataset is read
    check_flags(args, FLAG_DOMAINS)
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    loaded, name = read_set(args)
    run_out = EVAL_FILE if args.which == 'final' else EVAL_FILE.replace('.json', f'_{args.which}.json')
    out = args.out or (run_file(args.run, run_out) if args.run else os.path.join(args.run_dir, 'baselines',
                                                                                 f'eval_{name}.json'))
    out_folder = os.path.dirname(os.path.abspath(out))
    # the probe writes as many bytes as the result can take (with room): a disk too full for it fails now,
    # not after the evaluation
    check_writable(out_folder, 'output folder', need_bytes=result_bytes(args))
    remove_stray_temps(out_folder)
    data = load_dataset(args.dataset, args.data_path, zca=args.zca, subset=args.subset, res=args.res, valid=args.valid)
    images, labels, lr = source_on(data, args, loaded)
    args.eval_mode = args.eval_mode or [DEFAULT_MODEL[args.dataset]]
    for m in args.eval_mode:
        try:
            get_network(m, data.channel, data.num_classes, data.im_size)
        except ValueError as e:
            raise UsageError(f"--eval_mode {m}: {e}") from None
    seed_everything(args.seed)
    results = evaluate_set(args.eval_mode, (data.channel, data.num_classes, data.im_size), images.to(device),
                           labels.to(device), data.images_test.to(device), data.labels_test.to(device), lr=lr,
                           epochs=args.epoch_eval_train, num_eval=args.num_eval, seed=args.seed, lr_decay=args.lr_decay,
                           parallel=args.parallel_eval, accel=accel_for(device, channels_last=args.channels_last,
                                                                     bf16=args.bf16, tf32=args.tf32),
                           val=None if data.images_val is None else (data.images_val.to(device),
                                                                     data.labels_val.to(device)))
    print(markdown_table(results, f'{name} ({args.dataset}, lr {lr:.4g})'))
    atomic_write_json({'source': name, **({'which': args.which} if args.run else {}),
                       'dataset': args.dataset, 'lr': lr, 'epochs': args.epoch_eval_train,
                       'num_images': int(images.shape[0]),
                       'results': {r.model: {'accs': r.accs, 'mean': r.mean, 'std': r.std,
                                             # --lr_decay ast only: the authors' max over checks, chosen on test
                                             **({'max_acc_selected_on_test': r.max_acc_selected_on_test}
                                                if r.max_acc_selected_on_test else {}),
                                             **({'val_accs': r.val_accs, 'val_mean': r.val_mean} if r.val_accs else {})}
                                   for r in results}}, out)
    print(f"wrote {out}")
    return results


if __name__ == '__main__':
    main()
