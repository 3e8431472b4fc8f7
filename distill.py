"""Distill a dataset by matching expert training trajectories (MTT; docs/method.md, section 2).

    python distill.py --dataset Digits --ipc 10                 # a new numbered folder under runs/
    python distill.py --resume runs/003-Digits-ipc10-ConvNetD2  # continue it to the same --Iteration
    torchrun --nproc_per_node=K distill.py ...                  # K trajectories per iteration
Defaults are the Digits quickstart; buffer.sh / distill.sh presets set the paper's rows.

Under torchrun every process holds the same synthetic set; each samples its own expert, start epoch
and augmentations, and the image and syn_lr gradients are averaged before the step. Rank 0 alone
writes the run folder and evaluates. One process is the plain run, bit for bit.
"""
import argparse
import copy
import dataclasses
import math
import os
import shlex

import torch
from tqdm import tqdm

from data import DATASETS, DEFAULT_MODEL, SUBSETS, check_dataset, load_dataset
from distributed import (Dist, all_gather_objects, all_ranks_true, all_reduce_mean_, barrier, broadcast_,
                         broadcast_object, cleanup, from_env, init_distributed, mean_over_ranks, rank_seed)
from accel import accel_from_args, add_accel_flags
from evaluation import LR_DECAYS, PARALLEL_EVAL, evaluate_set, random_real
from matching import ATT_METRICS, UNROLLS, Targets, match_and_backward
from memplan import auto_unroll, describe_choice, describe_for_args
from networks import MODELS, get_network
from reparam_module import ReparamModule
from runlog import WANDB_MODES, RunLog, latest_run_dir, load_args, new_run_dir, save_args
from ast_components import (balance_weight, intermediate_betas, intermediate_steps, kmeans_init,
                            perturb_start)
from mct import compressed_dir
from reparam_module import load_flat_
from trajectory_io import ExpertCursor, ExpertTrajectory, buffer_dir, trajectory_kind, validate_buffers
from utils import (MOMENTUM, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, CliParser, Diverged, UsageError, WriteError,
                   atomic_torch_save, atomic_write_json, check_flags, check_saved_flags, check_writable, cli_entry,
                   explicit_flags, integer, pick_device, real, remove_stray_temps, rng_state, seed_everything,
                   set_rng_state)


# ---------------------------------------------------------------- flags (defaults: Digits quickstart)

def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data / model
    a('--dataset', default='Digits', choices=DATASETS)
    a('--subset', default='imagenette', choices=list(SUBSETS), help='ImageNet subset')
    a('--res', type=int, default=128, help='ImageNet subset resolution (pixels)')
    a('--model', default=None, choices=list(MODELS), help="default: the dataset's ConvNet")
    a('--zca', action='store_true', help='ZCA-whiten real and synthetic images (needs ZCA buffers)')
    a('--data_path', default='data')
    a('--buffer_path', default='buffers')
    # synthetic set
    a('--ipc', type=int, default=10, help='synthetic images per class')
    a('--pix_init', default='real', choices=['real', 'noise', 'kmeans', 'avg'],
      help="real: random real images; kmeans (AST's avg): real images nearest K-Means centroids of expert features")
    # trajectory matching
    a('--Iteration', type=int, default=500, help='outer (image update) iterations')
    a('--syn_steps', type=int, default=20, help='N: student steps on the synthetic set per iteration')
    a('--expert_epochs', type=int, default=2, help='M: expert epochs the student must cover')
    a('--max_start_epoch', type=int, default=10, help='T+: start epoch t ~ U{0..T+-1}')
    a('--lr_img', type=float, default=100, help='SGD lr of the synthetic images')
    a('--lr_lr', type=float, default=1e-5, help='SGD lr of the learnable student lr')
    a('--lr_teacher', type=float, default=0.01, help='initial student lr (syn_lr)')
    a('--batch_syn', type=int, default=None, help='student batch size; default: the whole synthetic set')
    a('--syn_mom', type=float, default=0.0, help='student heavy-ball momentum (AST uses 0.9)')
    a('--dsa', default='True', choices=['True', 'False'], help='DSA augmentation in the inner loop and eval')
    a('--unroll', default='auto', choices=(*UNROLLS, 'auto'),
      help='bptt keeps every step graph; recompute is exact with constant graph memory; auto: bptt when its '
           'predicted peak fits the free memory with a margin, else recompute (memplan.py)')
    a('--plan', action='store_true', help='print the predicted peak memory of one iteration for bptt and '
                                          'recompute, split into parts, and exit (needs no data or buffers)')
    a('--auto_steps', action='store_true', help='ATT: match at N_opt = argmin_n ||w_n - target|| (<= syn_steps)')
    a('--att_metric', default='l1', choices=ATT_METRICS, help='ATT distance')
    # AST components (docs/method.md, section 2), each independent of the others
    a('--balance_loss', action='store_true', help='AST: scale the inner CE by ν(t)')
    a('--balance_base', type=float, default=5.0, help='log base of ν (authors\' code: 5)')
    a('--agg_middle_loss', action='store_true', help='AST: add intermediate matching terms θ*_{t+i} at step floor(iN/M)')
    a('--adaptive_middle_loss', action='store_true',
      help='AST: intermediate matching with β_i = i/M instead of 1 (switches intermediate matching on by itself)')
    a('--weight_perturb', action='store_true', help='AST: perturb the student\'s start θ*_t (see --perturb_variant)')
    a('--perturb_rho', type=float, default=0.1, help='ρ of the paper variant (the code variant has none)')
    a('--perturb_variant', default='paper', choices=['paper', 'code'],
      help='paper: θ + ρ d, d per-filter normalised, every weight; code (the authors\' code, AST presets): '
           'θ + d ⊙ θ on 4-D weights, d/||d||_F, loss denominators from the perturbed start')
    # MCT (docs/method.md, MCT)
    a('--mct', action='store_true', help='read compressed buffers ({buffer}/mct{K}, compress_buffers.py) and '
                                        'sample real-valued start epochs')
    a('--mct_k', type=int, default=4, help='waypoints of the compressed buffers')
    a('--max_experts', type=int, default=None, help='use only the first K expert files')
    a('--expert_cache_mib', type=float, default=2048, help='keep loaded expert files in memory up to this (MiB)')
    a('--max_skips', type=int, default=10, help='stop (exit 3) after this many skipped steps in a row')
    a('--max_loss', type=float, default=1e4,
      help='skip a step whose matching loss is above this (1: the student ends as far from the target as the '
           'expert started): the images never take a step from an exploding unroll')
    # evaluation
    a('--eval_mode', nargs='+', default=None, choices=list(MODELS), help='architectures to evaluate (default: --model)')
    a('--eval_it', type=int, default=100, help='evaluate every this many iterations (and at the end)')
    a('--num_eval', type=int, default=5, help='networks per architecture per evaluation')
    a('--epoch_eval_train', type=int, default=1000,
      help="E: each evaluation network trains E+1 epochs, as the authors' evaluate_synset")
    a('--lr_decay', default='mtt', choices=list(LR_DECAYS),
      help="evaluation schedule, as the authors' evaluate_synset: mtt = E+1 epochs, lr x0.1 and a fresh SGD "
           "after epoch E//2+1; ast = the same with weight decay 1e-3, lr x0.5 and momentum 0.8")
    a('--parallel_eval', default='auto', choices=PARALLEL_EVAL,
      help='stack: train the num_eval networks together (vmap); loop: one at a time; auto: stack on CUDA, '
           'on CPU while the stacked batch stays small (same networks either way)')
    # run
    a('--seed', type=int, default=0)
    a('--device', default='auto')
    a('--run_dir', default='runs', help='numbered run folders go here')
    a('--save_every', type=int, default=50, help='checkpoint every this many iterations')
    a('--resume', default=None, help="run folder to continue, or 'latest' (the newest with a checkpoint); "
                                     "flags given with it override the run's: " + ', '.join(
                                         '--' + f for f in RESUME_OVERRIDABLE))
    a('--wandb', default='auto', choices=WANDB_MODES, help='auto: WANDB_MODE, else online if logged in, else offline')
    a('--project', default='ast-distill', help='wandb project')
    add_accel_flags(p)  # --channels_last/--bf16 reach evaluation only; the unroll is always fp32
    return p


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    args.model = args.model or DEFAULT_MODEL[args.dataset]
    args.eval_mode = args.eval_mode or [args.model]
    return args


# flag -> allowed values; checked before any work and before a run folder is made (on --resume: the run's
# args.json with the flags given)
FLAG_DOMAINS = {
    'ipc': POSITIVE_INT, 'Iteration': POSITIVE_INT, 'syn_steps': POSITIVE_INT, 'expert_epochs': POSITIVE_INT,
    'max_start_epoch': POSITIVE_INT, 'lr_img': POSITIVE, 'lr_lr': NON_NEGATIVE, 'lr_teacher': POSITIVE,
    'batch_syn': POSITIVE_INT.or_none('the whole set'), 'syn_mom': MOMENTUM, 'balance_base': real(1.0),
    'perturb_rho': NON_NEGATIVE, 'mct_k': integer(2), 'max_experts': POSITIVE_INT.or_none('all'),
    'expert_cache_mib': NON_NEGATIVE, 'max_skips': POSITIVE_INT, 'max_loss': POSITIVE, 'eval_it': POSITIVE_INT,
    'num_eval': POSITIVE_INT, 'epoch_eval_train': POSITIVE_INT, 'seed': SEED, 'save_every': POSITIVE_INT,
    'res': POSITIVE_INT,
}

# flags a --resume may change: step sizes, stopping rules, logging; never what the matching, the evaluation
# protocol (best is selected by it) or the random streams depend on
RESUME_OVERRIDABLE = ('lr_img', 'lr_lr', 'max_skips', 'max_loss', 'save_every', 'eval_it', 'expert_cache_mib',
                      'parallel_eval', 'wandb')


def resume_args(parser: argparse.ArgumentParser, argv, given_resume: str, run_root: str
                ) -> tuple[str, argparse.Namespace, dict]:
    """(run folder, the run's flags with the overrides applied, {flag: (old, new)} for each override)."""
    run_dir = latest_run_dir(run_root, holding='checkpoint.pt') if given_resume == 'latest' else given_resume
    if not run_dir or not os.path.isfile(os.path.join(run_dir, 'checkpoint.pt')):
        where = f"no run folder in {run_root} has one" if given_resume == 'latest' else f"none in {run_dir}"
        raise UsageError(f"--resume {given_resume}: needs a checkpoint.pt ({where}); give a run folder of "
                         f"distill.py that reached --save_every")
    saved = load_args(run_dir)
    check_saved_flags(parser, saved, os.path.join(run_dir, 'args.json'))
    merged = vars(parser.parse_args([]))  # defaults for flags newer than the run
    merged.update(saved)
    changes = {k: (merged.get(k), v) for k, v in explicit_flags(parser, argv).items()
               if k not in ('resume', 'run_dir') and v != merged.get(k)}
    refused = [k for k in changes if k not in RESUME_OVERRIDABLE]
    if refused:
        raise UsageError(f"--{refused[0]} cannot change when resuming {run_dir} (the run was made with "
                         f"{changes[refused[0]][0]!r}); flags that can: "
                         f"{', '.join('--' + f for f in RESUME_OVERRIDABLE)}; or start a new run")
    merged.update({k: new for k, (_, new) in changes.items()})
    return run_dir, argparse.Namespace(**merged), changes


SKIP_WORDS = {'nonfinite': 'non-finite loss or gradient', 'max_loss': 'loss above --max_loss',
              'syn_lr': 'the step would have made syn_lr <= 0 or non-finite', 'other_rank': 'skipped on another process'}


def resume_command(run_dir: str, world_size: int, **flags) -> str:
    how = f"torchrun --nproc_per_node={world_size} distill.py" if world_size > 1 else "python distill.py"
    return ' '.join([how, '--resume', shlex.quote(run_dir)] + [f"--{k} {v:g}" for k, v in flags.items()])


def guarded_step(opt_img: torch.optim.Optimizer, opt_lr: torch.optim.Optimizer, syn_lr: torch.Tensor) -> bool:
    """syn_lr's SGD step, then the images', unless syn_lr would leave (0, inf): then syn_lr and its momentum
    are put back and the images never take the step. Returns whether the step was taken."""
    before, state = syn_lr.detach().clone(), copy.deepcopy(opt_lr.state_dict())
    opt_lr.step()
    if not bool(torch.isfinite(syn_lr) & (syn_lr > 0)):
        with torch.no_grad():
            syn_lr.copy_(before)
        opt_lr.load_state_dict(state)
        return False
    opt_img.step()
    return True


# ---------------------------------------------------------------- setup (all checks before long work)

def init_synthetic(data, ipc: int, pix_init: str, generator: torch.Generator, *, expert_net=None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if pix_init == 'real':
        return random_real(data, ipc, generator)
    if pix_init in ('kmeans', 'avg'):
        return kmeans_init(expert_net.eval(), data.images_train, data.labels_train, data.num_classes, ipc, seed)
    labels = torch.arange(data.num_classes).repeat_interleave(ipc)
    return torch.randn(len(labels), data.channel, *data.im_size, generator=generator), labels


def prepare(args):
    """Every check that can fail fast: data, model/size, ipc, every expert file read. Returns (data, expert files)."""
    check_dataset(args.dataset, args.data_path, subset=args.subset)
    folder = buffer_dir(args.buffer_path, args.dataset, args.model, zca=args.zca, subset=args.subset, res=args.res)
    if not os.path.isdir(folder):
        raise UsageError(f"no expert buffers at {folder}; run buffer.py with the same --dataset/--model/--zca "
                         f"first (e.g. bash buffer.sh), or point --buffer_path at them")
    data = load_dataset(args.dataset, args.data_path, zca=args.zca, subset=args.subset, res=args.res)
    try:
        nets = [get_network(m, data.channel, data.num_classes, data.im_size)  # ValueError if the size does not fit
                for m in [args.model] + args.eval_mode]
    except ValueError as e:
        raise UsageError(f"--model/--eval_mode: {e}") from None
    data.check_ipc(args.ipc)
    if args.batch_syn is not None and args.batch_syn > args.ipc * data.num_classes:
        raise UsageError(f"--batch_syn {args.batch_syn} is larger than the synthetic set "
                         f"({args.ipc} x {data.num_classes} images); lower it or leave it unset")
    if args.mct:
        folder = compressed_dir(folder, args.mct_k)
        if not os.path.isdir(folder):
            raise UsageError(f"no compressed buffers at {folder}; run compress_buffers.py --k {args.mct_k} "
                             f"with the same --dataset/--model/--zca/--buffer_path first")
    files = validate_buffers(folder, dataset=args.dataset, model=args.model,
                             param_shapes=[p.shape for p in nets[0].parameters()],
                             needed_epochs=args.max_start_epoch + args.expert_epochs, compressed=args.mct,
                             zca=args.zca, max_experts=args.max_experts)
    return data, files


# ---------------------------------------------------------------- expert points and AST pieces

def trajectory_loader(mct: bool):
    return trajectory_kind(mct).load_file


def sample_start(max_start_epoch: int, continuous: bool, generator: torch.Generator) -> float | int:
    """t ~ U{0..T+-1} (MTT), or t ~ U[0, T+) real-valued on a compressed trajectory (MCT)."""
    if continuous:
        return float(torch.rand((), generator=generator)) * max_start_epoch
    return int(torch.randint(0, max_start_epoch, (1,), generator=generator))


def point(trajectory: ExpertTrajectory, s) -> torch.Tensor:
    """θ*(s): a stored snapshot, or MCT's convexified θ(s) for real s."""
    return trajectory.at(s)


def expert_targets(trajectory: ExpertTrajectory, t, *, syn_steps: int, expert_epochs: int, middle: bool,
                   adaptive: bool) -> Targets:
    """θ*_t, θ*_{t+M} and, with AST's intermediate matching, (n_i, θ*_{t+i}, β_i) for i = 1..M-1."""
    mids = []
    if middle:
        steps, betas = intermediate_steps(syn_steps, expert_epochs), intermediate_betas(expert_epochs, adaptive)
        mids = [(n, point(trajectory, t + i), beta) for i, (n, beta) in enumerate(zip(steps, betas), start=1)]
    return Targets(point(trajectory, t), point(trajectory, t + expert_epochs), mids)


def student_start(targets: Targets, param_shapes, *, perturb: bool, variant: str, rho: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, Targets]:
    """The student's w_0, and the targets its loss is normalised by. AST's weight perturbation moves w_0;
    the authors' code ('code') also measures every term's denominator ||start - target||² from that
    perturbed start, the paper ('paper') from the expert's own θ*_t (docs/method.md)."""
    if not perturb:
        return targets.start, targets
    w0 = perturb_start(targets.start, param_shapes, rho=rho, generator=generator, variant=variant)
    return w0, (dataclasses.replace(targets, start=w0) if variant == 'code' else targets)


def final_expert_net(files: list[str], mct: bool, net: torch.nn.Module) -> torch.nn.Module:
    """The first expert at its last epoch, for K-Means features."""
    traj = trajectory_loader(mct)(files[0])[0]
    load_flat_(net, point(traj, traj.num_epochs))
    return net


# ---------------------------------------------------------------- per-rank random streams

def rank_streams(seed: int, rank: int, init_gen: torch.Generator, files: list[str],
                 mct: bool, cache_mib: float = 2048) -> tuple[torch.Generator, ExpertCursor]:
    """The generator (start epochs, batches, DSA, perturbation) and expert cursor of one rank.

    Rank 0 continues the generator that drew the initial images and walks the experts from --seed,
    exactly as a plain run; rank r > 0 reseeds everything from rank_seed(seed, r) after the shared
    initialisation, so ranks match different trajectories from the same images.
    """
    gen = init_gen if rank == 0 else seed_everything(rank_seed(seed, rank))
    return gen, ExpertCursor(files, rank_seed(seed, rank), loader=trajectory_loader(mct), cache_mib=cache_mib)


def rank_state(cursor: ExpertCursor, gen: torch.Generator) -> dict:
    """What one rank needs to continue its own random streams after --resume."""
    return {'cursor': cursor.state_dict(), 'generator': gen.get_state(), 'rng': rng_state()}


def restore_rank_state(ckpt: dict, d: Dist, cursor: ExpertCursor, gen: torch.Generator) -> None:
    """Rank 0's streams are the checkpoint's top-level keys (as in a one-process checkpoint);
    rank r > 0's are ckpt['other_ranks'][r - 1]."""
    mine = ckpt if d.rank == 0 else ckpt['other_ranks'][d.rank - 1]
    cursor.load_state_dict(mine['cursor'])
    gen.set_state(mine['generator'])
    set_rng_state(mine['rng'])


CHECKPOINT_KEYS = ('images', 'syn_lr', 'labels', 'opt_img', 'opt_lr', 'cursor', 'generator', 'rng', 'state')
STATE_KEYS = ('it', 'best_acc', 'best_it', 'skipped', 'skips_in_row')


def load_checkpoint(run_dir: str, d: Dist) -> dict:
    """The run's checkpoint (on the CPU); it holds each rank's streams, so it continues only with as
    many processes."""
    path = os.path.join(run_dir, 'checkpoint.pt')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, foreign, or a pickle weights_only refuses (never loaded unsafely)
        raise UsageError(f"cannot read {path} ({type(e).__name__}): truncated, corrupt or not a distill.py "
                         f"checkpoint; restore it or start a new run") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ['(not a dict)']
    state = ckpt.get('state') if not missing else None
    missing += [f'state.{k}' for k in STATE_KEYS if not (isinstance(state, dict) and isinstance(state.get(k), (int, float))
                                                         and not isinstance(state.get(k), bool))]
    if missing:
        raise UsageError(f"{path} is not a distill.py checkpoint (missing {missing[0]}); restore it or start a new run")
    saved = ckpt.get('world_size', 1)  # checkpoints from before torchrun support: one process
    if saved != d.world_size:
        raise UsageError(f"{run_dir} was checkpointed by {saved} process(es), this is {d.world_size}; "
                         f"resume it with {resume_command(run_dir, saved)}")
    return ckpt


def restore(ckpt: dict, run_dir: str, d: Dist, syn_images, syn_lr, opt_img, opt_lr, cursor, gen) -> None:
    """Put the checkpoint's tensors, optimiser and random states in place (copy_, load_state_dict: onto the
    device); one that does not fit this run is a UsageError before any iteration."""
    path = os.path.join(run_dir, 'checkpoint.pt')
    images, lr = ckpt['images'], ckpt['syn_lr']
    if not (torch.is_tensor(images) and images.shape == syn_images.shape and torch.is_tensor(lr) and lr.numel() == 1):
        raise UsageError(f"{path} holds images of shape {tuple(getattr(images, 'shape', ()))}, this run's are "
                         f"{tuple(syn_images.shape)}; it belongs to another run")
    try:
        with torch.no_grad():
            syn_images.copy_(images)
            syn_lr.copy_(lr.reshape(()))
        opt_img.load_state_dict(ckpt['opt_img'])
        opt_lr.load_state_dict(ckpt['opt_lr'])
        restore_rank_state(ckpt, d, cursor, gen)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{path} does not fit this run ({type(e).__name__}); restore it or start a new run") from None


# ---------------------------------------------------------------- main loop

@cli_entry
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {}
    if args.resume:  # the run's own flags (never wandb's), with the safe ones given here overriding them
        run_dir, args, overrides = resume_args(parser, argv, args.resume, args.run_dir)
        if os.path.exists(os.path.join(run_dir, 'final.json')):  # nothing to do: the folder stays as it is
            print(f"{run_dir} has finished (final.json); nothing to resume"
                  + (f" (ignored: {', '.join('--' + k for k in overrides)})" if overrides else ''))
            return run_dir
    else:
        args = finalize_args(args)
        run_dir = None
    # every check runs before any work and before a run folder is made
    check_flags(args, FLAG_DOMAINS)
    device = pick_device(args.device)
    if args.plan:  # needs no data, buffers or run folder: the dataset's shape is known
        try:
            print(describe_for_args(args, device))
        except ValueError as e:
            raise UsageError(f"--plan: {e}") from None
        return None
    check_writable(run_dir or args.run_dir, 'run folder' if run_dir else '--run_dir')
    if run_dir and from_env().is_main:  # rank 0 alone writes the run folder (under torchrun: before init)
        remove_stray_temps(run_dir)
    data, files = prepare(args)
    d, device = init_distributed(device)
    ckpt = load_checkpoint(run_dir, d) if run_dir else None
    if args.unroll == 'auto':  # resolved once and saved in args.json, so a resumed run keeps the mode
        choice = auto_unroll(args, data, files, device)
        choice['unroll'] = 'bptt' if all_ranks_true(choice['bptt_fits']) else 'recompute'  # one mode on all ranks
        args.unroll, args.unroll_plan = choice['unroll'], choice
        if d.is_main:
            print(describe_choice(choice))

    gen = seed_everything(args.seed)
    expert_net = None
    if args.pix_init in ('kmeans', 'avg'):
        net = get_network(args.model, data.channel, data.num_classes, data.im_size)
        expert_net = final_expert_net(files, args.mct, net).to(device)
    syn_images, syn_labels = init_synthetic(data, args.ipc, args.pix_init, gen, expert_net=expert_net,
                                            seed=args.seed)
    # the same start on every rank even if K-Means or the device differed; averaged steps keep it so
    syn_images = broadcast_(syn_images.to(device)).requires_grad_(True)
    syn_labels = syn_labels.to(device)
    syn_lr = torch.tensor(args.lr_teacher, device=device, requires_grad=True)
    opt_img = torch.optim.SGD([syn_images], lr=args.lr_img, momentum=0.5)
    opt_lr = torch.optim.SGD([syn_lr], lr=args.lr_lr, momentum=0.5)
    gen, cursor = rank_streams(args.seed, d.rank, gen, files, args.mct, args.expert_cache_mib)
    accel = accel_from_args(args, device)
    num_syn = syn_images.shape[0]
    batch_syn = args.batch_syn or num_syn
    student = ReparamModule(get_network(args.model, data.channel, data.num_classes, data.im_size).to(device))
    param_shapes = student.param_shapes
    n_finals = []  # ATT's N_opt since the last evaluation, for the histogram
    test_x, test_y = data.images_test.to(device), data.labels_test.to(device)
    data_shape = (data.channel, data.im_size, data.num_classes)

    state = {'it': 0, 'best_acc': -1.0, 'best_it': -1, 'skipped': 0, 'skips_in_row': 0}
    log = None  # rank 0 alone writes metrics, wandb, images and checkpoints
    if ckpt is not None:  # resume: restore everything the loop reads
        restore(ckpt, run_dir, d, syn_images, syn_lr, opt_img, opt_lr, cursor, gen)
        state = ckpt['state']
        if not (isinstance(state['it'], int) and 0 <= state['it'] <= args.Iteration):
            raise UsageError(f"{run_dir}/checkpoint.pt is at iteration {state['it']!r}, outside 0..{args.Iteration} "
                             f"of its args.json; restore the run's files or start a new run")
        for group, lr in ((opt_img.param_groups[0], args.lr_img), (opt_lr.param_groups[0], args.lr_lr)):
            group['lr'] = lr  # the flags are the truth: a --resume override takes effect here
        if overrides:  # recorded with the iteration it took effect; a new streak of skips starts
            state['skips_in_row'] = 0
            earlier = getattr(args, 'resume_overrides', [])
            args.resume_overrides = (earlier if isinstance(earlier, list) else []) + [
                {'it': state['it'], **{k: {'was': old, 'now': new} for k, (old, new) in overrides.items()}}]
            if d.is_main:
                save_args(run_dir, vars(args))
        if d.is_main:
            log = RunLog(run_dir, vars(args), wandb_mode=args.wandb, project=args.project,
                         wandb_id=ckpt.get('wandb_id'))
            log.truncate_after(state['it'] - 1)
    else:
        if d.is_main:
            run_dir = new_run_dir(args.run_dir, f'{args.dataset}-ipc{args.ipc}-{args.model}')
            save_args(run_dir, vars(args))
            log = RunLog(run_dir, vars(args), wandb_mode=args.wandb, project=args.project)
        run_dir = broadcast_object(run_dir)  # one folder per run, named by rank 0
    if d.is_main:
        print(f"{'run folder:' if ckpt is None else 'resuming'} {run_dir}  (wandb: {log.mode})"
              + (f"  ({d.world_size} processes)" if d.world_size > 1 else '')
              + ('' if ckpt is None else "; its args.json flags are used"
                 + (f", with {', '.join(f'--{k} {new}' for k, (_, new) in overrides.items())}" if overrides else '')))

    def checkpoint():
        """Collective: every rank hands its streams to rank 0, which writes; all leave once it is on disk."""
        ranks = all_gather_objects(rank_state(cursor, gen))
        if d.is_main:
            path = os.path.join(run_dir, 'checkpoint.pt')
            try:
                atomic_torch_save({'images': syn_images.detach().cpu(), 'syn_lr': syn_lr.detach().cpu(),
                                   'labels': syn_labels.cpu(), 'opt_img': opt_img.state_dict(),
                                   'opt_lr': opt_lr.state_dict(), **ranks[0], 'other_ranks': ranks[1:],
                                   'world_size': d.world_size, 'state': state, 'wandb_id': log.wandb_id}, path)
            except WriteError as e:
                later = (f"then continue with {resume_command(run_dir, d.world_size)}" if os.path.exists(path)
                         else "no checkpoint was written yet: start the run again")
                raise WriteError(f"{e}; {later}") from None
        barrier()

    def evaluate(it: int):
        results = evaluate_set(args.eval_mode, data_shape, syn_images, syn_labels, test_x, test_y,
                               lr=syn_lr.item(), epochs=args.epoch_eval_train, num_eval=args.num_eval,
                               seed=args.seed * 1000 + it, lr_decay=args.lr_decay, parallel=args.parallel_eval,
                               accel=accel)
        metrics = {}
        for r in results:
            metrics[f'eval/{r.model}_mean'], metrics[f'eval/{r.model}_std'] = r.mean, r.std
            if r.max_acc_selected_on_test:  # --lr_decay ast: the authors' max over checks, chosen on the test set
                maxes = r.max_acc_selected_on_test
                metrics[f'eval/{r.model}_max_selected_on_test'] = sum(maxes) / len(maxes)
            tqdm.write(f"it {it}: {r}")
        if results[0].mean > state['best_acc']:  # best is selected on the test set: labelled as such
            state['best_acc'], state['best_it'] = results[0].mean, it
            atomic_torch_save(syn_images.detach().cpu(), os.path.join(run_dir, 'images_best.pt'))
            atomic_torch_save(syn_labels.cpu(), os.path.join(run_dir, 'labels_best.pt'))
            atomic_torch_save(syn_lr.detach().cpu(), os.path.join(run_dir, 'lr_best.pt'))
        metrics['eval/best_mean_selected_on_test'] = state['best_acc']
        log.log(it, **metrics)
        nrow = args.ipc if args.ipc > 1 else data.num_classes
        log.save_grid(data.to_pixels(syn_images.detach().cpu()), nrow, 'synthetic_images', it)

    bar = tqdm(range(state['it'], args.Iteration), initial=state['it'], total=args.Iteration, desc='distill',
               disable=not d.is_main)
    for it in bar:
        if it % args.eval_it == 0:
            if d.is_main:  # the other ranks go on with their unroll and wait in the next collective
                evaluate(it)
                log.histogram('att/n_opt', n_finals, it)
            n_finals.clear()
        trajectory = cursor.next()
        t = sample_start(args.max_start_epoch, args.mct, gen)
        targets = expert_targets(trajectory, t, syn_steps=args.syn_steps, expert_epochs=args.expert_epochs,
                                 middle=args.agg_middle_loss or args.adaptive_middle_loss,
                                 adaptive=args.adaptive_middle_loss)
        w0, targets = student_start(targets, param_shapes, perturb=args.weight_perturb, variant=args.perturb_variant,
                                    rho=args.perturb_rho, generator=gen)
        nu = balance_weight(t, args.max_start_epoch, base=args.balance_base) if args.balance_loss else 1.0
        opt_img.zero_grad(set_to_none=True)
        opt_lr.zero_grad(set_to_none=True)
        loss, info = match_and_backward(student, syn_images, syn_labels, syn_lr, w0, targets,
                                        syn_steps=args.syn_steps, batch_syn=batch_syn, generator=gen,
                                        syn_mom=args.syn_mom, use_dsa=args.dsa == 'True', loss_weight=nu,
                                        unroll_mode=args.unroll, auto_steps=args.auto_steps,
                                        att_metric=args.att_metric)
        n_finals.append(info['n_final'])
        loss_value = loss.item()  # one host sync for both checks
        finite = math.isfinite(loss_value) and syn_images.grad is not None and bool(
            torch.isfinite(syn_images.grad).all() and torch.isfinite(syn_lr.grad))
        bounded = finite and loss_value <= args.max_loss
        # agreed first: every rank then skips or steps together, and a skipped step needs no all-reduce.
        # A non-finite or exploding loss or gradient (on any rank), or a step that would take syn_lr out
        # of (0, inf) (the same on every rank: the averaged gradient), never reaches the images
        agreed, stepped = all_ranks_true(bounded), False
        if agreed:
            all_reduce_mean_([syn_images.grad, syn_lr.grad])  # the mean over the ranks' trajectories
            stepped = guarded_step(opt_img, opt_lr, syn_lr)
        skip = None if stepped else ('nonfinite' if not finite else 'max_loss' if not bounded
                                     else 'syn_lr' if agreed else 'other_rank')
        if stepped:
            state['skips_in_row'] = 0
        else:
            state['skipped'] += 1
            state['skips_in_row'] += 1
        state['it'] = it + 1
        # the logged loss and its terms are means over ranks; start_epoch, nu and n_final are rank 0's own
        loss = mean_over_ranks(loss)
        info = {k: mean_over_ranks(v) if torch.is_tensor(v) else v for k, v in info.items()}
        if d.is_main:
            log.log(it, loss=loss.item(), syn_lr=syn_lr.item(), start_epoch=t, nu=nu, skipped=state['skipped'],
                    **({'skip_reason': skip} if skip else {}), **info)
            bar.set_postfix(loss=f'{loss.item():.4f}', syn_lr=f'{syn_lr.item():.2e}', skipped=state['skipped'])
        if state['skips_in_row'] >= args.max_skips:
            checkpoint()
            smaller = {'lr_img': args.lr_img / 10, **({'lr_lr': args.lr_lr / 10} if args.lr_lr > 0 else {})}
            raise Diverged(f"{args.max_skips} steps in a row were skipped (it {it}; last: {SKIP_WORDS[skip]}); the "
                           f"run is checkpointed: continue it with smaller steps, e.g. "
                           f"{resume_command(run_dir, d.world_size, **smaller)}"
                           + (" (or a larger --max_loss)" if skip == 'max_loss' else ''))
        if state['it'] % args.save_every == 0:
            checkpoint()
    # the loop ends at --Iteration (a finished run returned before it); a crash after the last checkpoint
    # but before final.json resumes here and finishes
    if d.is_main:
        evaluate(args.Iteration)
    checkpoint()
    if d.is_main:
        summary = {'best_mean_selected_on_test': state['best_acc'], 'best_it': state['best_it'],
                   'skipped_steps': state['skipped'], 'syn_lr': syn_lr.item()}
        atomic_write_json(summary, os.path.join(run_dir, 'final.json'))
        print(f"done: best {100 * state['best_acc']:.2f}% at it {state['best_it']} (selected on test); "
              f"{run_dir}")
    if d.is_main:
        log.finish()
    cleanup()
    return run_dir


if __name__ == '__main__':
    main()
