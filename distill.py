"""Distill a dataset by matching expert training trajectories (MTT; docs/method.md, section 2).

    python distill.py --dataset Digits --ipc 10                 # a new numbered folder under runs/
    python distill.py --resume runs/003-Digits-ipc10-ConvNetD2  # continue it to the same --Iteration
    torchrun --nproc_per_node=K distill.py ...                  # K trajectories per iteration
    python distill.py --trajectories K ...                      # K trajectories per iteration, one device
Defaults are the Digits quickstart; buffer.sh / distill.sh presets set the paper's rows.

Under torchrun every process holds the same synthetic set; each samples its own expert, start epoch
and augmentations, and the image and syn_lr gradients are averaged before the step. Rank 0 alone
writes the run folder and evaluates. One process is the plain run, bit for bit. --trajectories K
matches K trajectories in one vectorised unroll, with the streams of K such processes (per process,
under torchrun); 1, the default, is the plain run.
"""
import argparse
import dataclasses
import math
import os

import torch
from tqdm import tqdm

from trajmatch.accel import accel_for, add_accel_flags
from trajmatch.ast_components import (KMEANS_FEATURES, MIDDLE_STEPS, balance_weight, intermediate_betas,
                                      intermediate_steps, perturb_start)
from trajmatch.checkpoint import (LoopState, load_checkpoint, restore, resume_command, save_checkpoint,
                                  student_streams)
from trajmatch.cli import (EPOCHS, EPOCHS_MAX, ITERATIONS, MOMENTUM, NETWORKS, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED,
                           STEPS, CliParser, Diverged, UsageError, check_flags, check_saved_flags, cli_entry,
                           explicit_flags, integer, real)
from trajmatch.data import DATA_FLAG_DOMAINS, DEFAULT_MODEL, add_data_flags, check_dataset, dataset_meta, load_dataset
from trajmatch.distributed import (Dist, all_ranks_true, all_reduce_mean_, broadcast_, broadcast_object, cleanup, from_env,
                         init_distributed, mean_over_ranks)
from trajmatch.evaluation import LR_DECAYS, PARALLEL_EVAL, evaluate_set
from trajmatch.matching import ATT_METRICS, RECOMPUTE_STATES_MIB, UNROLLS, Targets, Unroll, match_and_backward
from trajmatch.mct import compressed_dir
from trajmatch.memplan import (RunShape, choose_unroll, describe_choice, describe_run, expert_cache_bytes, free_bytes,
                              make_plan)
from networks import MODELS, get_network
from reparam_module import ReparamModule
from trajmatch.runlog import (ARGS_FILE, CHECKPOINT_FILE, FINAL_FILE, GRID_NAME, WANDB_MODES, RunLog, latest_run_dir,
                    load_args, new_run_dir, run_file, save_args, save_best, save_final)
from trajmatch.synthetic import SyntheticSet, final_expert_net, init_synthetic
from trajmatch.trajectory_io import ExpertCursor, ExpertTrajectory, buffer_dir, read_meta, validate_buffers
from trajmatch.files import atomic_write_json, check_writable, remove_stray_temps, remove_stray_temps_under
from trajmatch.runtime import pick_device, seed_everything, set_deterministic
from trajmatch.stacked import stackable


# ---------------------------------------------------------------- flags (defaults: Digits quickstart)

def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # data / model
    add_data_flags(p)
    a('--model', default=None, choices=list(MODELS), help="default: the dataset's ConvNet")
    a('--buffer_path', default='buffers')
    # synthetic set
    a('--ipc', type=int, default=10, help='synthetic images per class')
    a('--pix_init', default='real', choices=['real', 'noise', 'kmeans', 'avg'],
      help="real: random real images; kmeans / avg (the AST authors' spelling): real images nearest K-Means "
           "centroids of an expert's features (see --kmeans_features)")
    a('--kmeans_features', default=None, choices=KMEANS_FEATURES,
      help="what K-Means clusters: penultimate (the paper's features; default with --pix_init kmeans) or logits "
           "(the expert's output, as the authors' distill.py; default with --pix_init avg, the AST presets)")
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
    a('--recompute_states_mib', type=float, default=RECOMPUTE_STATES_MIB,
      help="recompute keeps every step's (w_n, b_n) while the N pairs fit in this many MiB, so it regenerates "
           "nothing; beyond it, checkpoints every ceil(sqrt(N)) steps (0: always checkpoints)")
    a('--plan', action='store_true', help='print the predicted peak memory of one iteration for bptt and '
                                          'recompute, split into parts, and exit (needs no data or buffers)')
    a('--auto_steps', action='store_true', help='ATT: match at N_opt = argmin_n ||w_n - target|| (<= syn_steps)')
    a('--att_metric', default='l1', choices=ATT_METRICS, help='ATT distance')
    # AST components (docs/method.md, section 2), each independent of the others
    a('--balance_loss', action='store_true', help='AST: scale the inner CE by ν(t)')
    a('--balance_base', type=float, default=5.0, help='log base of ν (authors\' code: 5)')
    a('--agg_middle_loss', action='store_true', help='AST: add intermediate matching terms θ*_{t+i} (see --middle_steps)')
    a('--middle_steps', default='code', choices=MIDDLE_STEPS,
      help="student step of the i-th intermediate term: code (the authors' distill.py, the AST presets) (N // M) * i; "
           "paper floor(i N / M)")
    a('--adaptive_middle_loss', action='store_true',
      help='AST: intermediate matching with β_i = i/M instead of 1 (switches intermediate matching on by itself)')
    a('--weight_perturb', action='store_true', help='AST: perturb the student\'s start θ*_t (see --perturb_variant)')
    a('--perturb_rho', type=float, default=0.1, help='ρ of the paper variant (the code variant has none)')
    a('--perturb_variant', default='code', choices=['paper', 'code'],
      help='code (the authors\' code, what --weight_perturb does there; AST presets): θ + d ⊙ θ on 4-D weights, '
           'd/||d||_F, loss denominators from the perturbed start; paper: θ + ρ d, d per-filter normalised, every weight')
    # MCT (docs/method.md, MCT)
    a('--mct', action='store_true', help='read compressed buffers ({buffer}/mct{K}, compress_buffers.py) and '
                                        'sample real-valued start epochs')
    a('--mct_k', type=int, default=4, help='waypoints of the compressed buffers')
    a('--trajectories', type=int, default=1,
      help='K: trajectories matched per iteration (per process under torchrun) in one vectorised unroll, the '
           'update the mean of their K gradients, as K torchrun processes; memory x K (not with --auto_steps '
           'or a BatchNorm model)')
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
    if args.kmeans_features is None:  # the authors' spelling (avg) means the authors' features
        args.kmeans_features = 'logits' if args.pix_init == 'avg' else 'penultimate'
    return args


# flags whose default changed (issue 26): a run whose args.json predates them ran with these, and resumes so
LEGACY_DEFAULTS = {'middle_steps': 'paper', 'kmeans_features': 'penultimate', 'perturb_variant': 'paper'}


# --trajectories: students stacked on one device; more is a typo (memory grows K-fold; torchrun adds devices)
TRAJECTORIES_MAX = 64


# flag -> allowed values; checked before any work and before a run folder is made (on --resume: the run's
# args.json with the flags given)
FLAG_DOMAINS = {
    'ipc': POSITIVE_INT, 'Iteration': ITERATIONS, 'syn_steps': STEPS, 'expert_epochs': EPOCHS,
    'max_start_epoch': EPOCHS, 'lr_img': POSITIVE, 'lr_lr': NON_NEGATIVE, 'lr_teacher': POSITIVE,
    'batch_syn': POSITIVE_INT.or_none('the whole set'), 'syn_mom': MOMENTUM,
    'perturb_rho': NON_NEGATIVE, 'mct_k': integer(2, EPOCHS_MAX + 1), 'max_experts': POSITIVE_INT.or_none('all'),
    'max_skips': POSITIVE_INT, 'eval_it': POSITIVE_INT, 'trajectories': integer(1, TRAJECTORIES_MAX),
    'num_eval': NETWORKS, 'epoch_eval_train': EPOCHS, 'seed': SEED, 'save_every': POSITIVE_INT,
    # used by Python alone (float64): the loss's .item(), the cache's byte count, ν's math.log
    'max_loss': real(0.0, float32=False), 'expert_cache_mib': real(0.0, strict=False, float32=False),
    'recompute_states_mib': real(0.0, strict=False, float32=False),
    'balance_base': real(1.0, float32=False),
    **DATA_FLAG_DOMAINS,
}


def check_trajectories(args: argparse.Namespace) -> None:
    """What K > 1 students cannot do (the BatchNorm check needs the model: prepare)."""
    if args.trajectories > 1 and args.auto_steps:
        raise UsageError(f"--trajectories {args.trajectories} with --auto_steps: ATT matches each trajectory at its "
                         f"own N_opt, which one stacked unroll does not do; drop one of them (torchrun gives ATT K "
                         f"trajectories per iteration)")


# flags a --resume may change: step sizes, stopping rules, logging; never what the matching, the evaluation
# protocol (best is selected by it) or the random streams depend on
RESUME_OVERRIDABLE = ('lr_img', 'lr_lr', 'max_skips', 'max_loss', 'save_every', 'eval_it', 'expert_cache_mib',
                      'parallel_eval', 'wandb', 'device', 'recompute_states_mib')

# what args.json records beside the flags (the flags themselves never change after they are resolved):
# 'resolved' = {'unroll': the mode --unroll auto chose, 'unroll_plan': why, 'device': where}, and
# 'resume_overrides' = [{'it': ..., flag: {'was': .., 'now': ..}}, ...]
RECORD_KEYS = ('resolved', 'resume_overrides')


def split_record(saved: dict) -> tuple[dict, dict]:
    """args.json -> (flags, record). Runs from before the record kept the chosen mode in 'unroll' and the
    plan in 'unroll_plan': read as --unroll auto with that choice (made on the run's device)."""
    flags = {k: v for k, v in saved.items() if k not in RECORD_KEYS + ('unroll_plan',)}
    record = {k: saved[k] for k in RECORD_KEYS if k in saved}
    if isinstance(saved.get('unroll_plan'), dict) and 'resolved' not in record:
        record['resolved'] = {'unroll': saved.get('unroll'), 'unroll_plan': saved['unroll_plan']}
        flags['unroll'] = 'auto'
    return flags, record


def resume_args(parser: argparse.ArgumentParser, argv, given_resume: str, run_root: str
                ) -> tuple[str, argparse.Namespace, dict, dict]:
    """(run folder, the run's flags with the overrides applied, {flag: (old, new)} for each override, the
    record args.json keeps beside the flags)."""
    run_dir = latest_run_dir(run_root, holding=CHECKPOINT_FILE) if given_resume == 'latest' else given_resume
    if not run_dir or not os.path.isfile(run_file(run_dir, CHECKPOINT_FILE)):
        where = f"no run folder in {run_root} has one" if given_resume == 'latest' else f"none in {run_dir}"
        raise UsageError(f"--resume {given_resume}: needs a {CHECKPOINT_FILE} ({where}); give a run folder of "
                         f"distill.py that reached --save_every")
    saved, record = split_record(load_args(run_dir))
    check_saved_flags(parser, saved, run_file(run_dir, ARGS_FILE))
    merged = vars(parser.parse_args([]))  # defaults for flags newer than the run
    merged.update(LEGACY_DEFAULTS)        # ... as they were when the run was made
    merged.update(saved)
    changes = {k: (merged.get(k), v) for k, v in explicit_flags(parser, argv).items()
               if k not in ('resume', 'run_dir') and v != merged.get(k)}
    refused = [k for k in changes if k not in RESUME_OVERRIDABLE]
    if refused:
        raise UsageError(f"--{refused[0]} cannot change when resuming {run_dir} (the run was made with "
                         f"{changes[refused[0]][0]!r}); flags that can: "
                         f"{', '.join('--' + f for f in RESUME_OVERRIDABLE)}; or start a new run")
    merged.update({k: new for k, (_, new) in changes.items()})
    return run_dir, argparse.Namespace(**merged), changes, record


SKIP_WORDS = {'nonfinite': 'non-finite loss or gradient', 'max_loss': 'loss above --max_loss',
              'syn_lr': 'the step would have made syn_lr <= 0 or non-finite', 'other_rank': 'skipped on another process',
              'nonfinite_set': 'a step left NaN or infinite images'}  # the last stops the run at once


# ---------------------------------------------------------------- setup (all checks before long work)

def check_valid_split(folder: str, valid: int) -> None:
    """The experts must have trained on this run's training images: with the same --valid split."""
    meta = read_meta(folder, 0)
    trained = meta.get('valid', 0) if meta else valid  # sidecars before --valid: no split; no sidecar: unknown
    if trained != valid:
        raise UsageError(f"the experts in {folder} were trained with --valid {trained}, this run has --valid {valid}; "
                         f"give --valid {trained} or train experts with --valid {valid}")


def prepare(args):
    """Every check that can fail fast: data, model/size, ipc, every expert file read. Returns (data, expert files)."""
    check_dataset(args.dataset, args.data_path, subset=args.subset)
    folder = buffer_dir(args.buffer_path, args.dataset, args.model, zca=args.zca, subset=args.subset, res=args.res)
    if not os.path.isdir(folder):
        raise UsageError(f"no expert buffers at {folder}; run buffer.py with the same --dataset/--model/--zca "
                         f"first (e.g. bash buffer.sh), or point --buffer_path at them")
    check_valid_split(folder, args.valid)
    data = load_dataset(args.dataset, args.data_path, zca=args.zca, subset=args.subset, res=args.res, valid=args.valid)
    try:
        nets = [get_network(m, data.channel, data.num_classes, data.im_size)  # ValueError if the size does not fit
                for m in [args.model] + args.eval_mode]
    except ValueError as e:
        raise UsageError(f"--model/--eval_mode: {e}") from None
    if args.trajectories > 1 and not stackable(nets[0]):
        raise UsageError(f"--trajectories {args.trajectories}: {args.model} has BatchNorm running statistics, which K "
                         f"students in one vectorised unroll cannot keep apart; use a model without BatchNorm, or "
                         f"torchrun with --trajectories 1")
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

def sample_start(max_start_epoch: int, continuous: bool, generator: torch.Generator) -> float | int:
    """t ~ U{0..T+-1} (MTT), or t ~ U[0, T+) real-valued on a compressed trajectory (MCT)."""
    if continuous:
        return float(torch.rand((), generator=generator)) * max_start_epoch
    return int(torch.randint(0, max_start_epoch, (1,), generator=generator))


def expert_targets(trajectory: ExpertTrajectory, t, *, syn_steps: int, expert_epochs: int, middle: bool,
                   adaptive: bool, rule: str = 'paper') -> Targets:
    """θ*_t, θ*_{t+M} and, with AST's intermediate matching, (n_i, θ*_{t+i}, β_i) for i = 1..M-1 (θ*(s): a
    stored snapshot, or MCT's convexified θ(s) for real s)."""
    mids = []
    if middle:
        steps, betas = intermediate_steps(syn_steps, expert_epochs, rule), intermediate_betas(expert_epochs, adaptive)
        mids = [(n, trajectory.at(t + i), beta) for i, (n, beta) in enumerate(zip(steps, betas), start=1)]
    return Targets(trajectory.at(t), trajectory.at(t + expert_epochs), mids)


def student_start(targets: Targets, param_shapes, *, perturb: bool, variant: str, rho: float,
                  generator: torch.Generator) -> tuple[torch.Tensor, Targets]:
    """The student's w_0, and the targets its loss is normalised by. AST's weight perturbation moves w_0;
    the authors' code ('code') also measures every term's denominator ||start - target||² from that
    perturbed start, the paper ('paper') from the expert's own θ*_t (docs/method.md)."""
    if not perturb:
        return targets.start, targets
    w0 = perturb_start(targets.start, param_shapes, rho=rho, generator=generator, variant=variant)
    return w0, (dataclasses.replace(targets, start=w0) if variant == 'code' else targets)


# ---------------------------------------------------------------- one iteration

@dataclasses.dataclass(frozen=True)
class Matching:
    """How one iteration samples, unrolls and steps (the flags, fixed for the run)."""
    unroll: Unroll            # how the student is unrolled: travels whole into match_and_backward
    expert_epochs: int
    max_start_epoch: int
    middle: bool              # AST intermediate matching
    adaptive: bool            # ... with β_i = i/M
    middle_rule: str          # ... at the steps of this rule (ast_components.intermediate_steps)
    perturb: bool
    perturb_variant: str
    perturb_rho: float
    balance: bool
    balance_base: float
    max_loss: float

    @classmethod
    def from_args(cls, args: argparse.Namespace, num_syn: int, unroll_mode: str) -> 'Matching':
        """The flags, with --unroll auto resolved to `unroll_mode`."""
        unroll = Unroll(syn_steps=args.syn_steps, batch_syn=args.batch_syn or num_syn, syn_mom=args.syn_mom,
                        use_dsa=args.dsa == 'True', mode=unroll_mode, auto_steps=args.auto_steps,
                        att_metric=args.att_metric, states_mib=args.recompute_states_mib)
        return cls(unroll=unroll, expert_epochs=args.expert_epochs, max_start_epoch=args.max_start_epoch,
                   middle=args.agg_middle_loss or args.adaptive_middle_loss,
                   adaptive=args.adaptive_middle_loss, middle_rule=args.middle_steps, perturb=args.weight_perturb,
                   perturb_variant=args.perturb_variant, perturb_rho=args.perturb_rho, balance=args.balance_loss,
                   balance_base=args.balance_base, max_loss=args.max_loss)


@dataclasses.dataclass
class Step:
    """What one iteration did: loss and info are means over the ranks; t and nu are this rank's own."""
    t: float | int
    nu: float
    loss: torch.Tensor
    info: dict
    skip: str | None   # why the step was refused (a SKIP_WORDS key), None if it was taken


def sample_student(trajectory: ExpertTrajectory, gen: torch.Generator, m: Matching,
                   param_shapes) -> tuple[float | int, torch.Tensor, Targets, float]:
    """One student's draws before its unroll, in this order from `gen`: the start epoch t, then AST's
    perturbation of w_0. Returns (t, w_0, targets, ν)."""
    t = sample_start(m.max_start_epoch, trajectory.continuous_time, gen)  # MCT: real-valued
    targets = expert_targets(trajectory, t, syn_steps=m.unroll.syn_steps, expert_epochs=m.expert_epochs,
                             middle=m.middle, adaptive=m.adaptive, rule=m.middle_rule)
    w0, targets = student_start(targets, param_shapes, perturb=m.perturb, variant=m.perturb_variant,
                                rho=m.perturb_rho, generator=gen)
    nu = balance_weight(t, m.max_start_epoch, base=m.balance_base) if m.balance else 1.0
    return t, w0, targets, nu


def stack_students(samples: list[tuple], like: torch.Tensor) -> tuple[torch.Tensor, Targets, torch.Tensor]:
    """K students' (t, w_0, targets, ν) as one stacked unroll takes them: w_0 and every target [K, P] (the
    intermediate steps n_i and β_i are the same for all: they depend on the flags alone), ν a [K] tensor
    of the images' dtype on their device (one copy per iteration, not one per step)."""
    targets = [s[2] for s in samples]
    middle = [(n, torch.stack([tg.middle[i][1] for tg in targets]), beta)
              for i, (n, _, beta) in enumerate(targets[0].middle)]
    stacked = Targets(torch.stack([tg.start for tg in targets]), torch.stack([tg.final for tg in targets]), middle)
    nus = torch.tensor([s[3] for s in samples], dtype=like.dtype, device=like.device)
    return torch.stack([s[1] for s in samples]), stacked, nus


def iteration(syn: SyntheticSet, student: ReparamModule, trajectory: ExpertTrajectory | list, gen: torch.Generator,
              m: Matching) -> Step:
    """Sample a start, unroll the student on the set, match the expert, and step the set (all ranks together).
    --trajectories K > 1: `trajectory` is one per student and `gen` a GeneratorGroup; the K students unroll
    together and the step is the mean of their gradients (t and ν logged are the first student's)."""
    if isinstance(trajectory, list):
        samples = [sample_student(tr, g, m, student.param_shapes) for tr, g in zip(trajectory, gen.generators)]
        t, nu = samples[0][0], samples[0][3]
        w0, targets, weight = stack_students(samples, syn.images)
        generator = gen.generators
    else:
        t, w0, targets, nu = sample_student(trajectory, gen, m, student.param_shapes)
        weight, generator = nu, gen
    syn.zero_grad()
    loss, info = match_and_backward(student, syn.images, syn.labels, syn.lr, w0, targets, m.unroll,
                                    generator=generator, loss_weight=weight)
    # K students: --max_loss bounds each one's loss, as it bounds each rank's under torchrun
    per_student = info.pop('loss_students', None)
    losses = [loss.item()] if per_student is None else per_student.tolist()  # one host sync for both checks
    finite = all(math.isfinite(v) for v in losses) and syn.grads_finite()
    bounded = finite and max(losses) <= m.max_loss
    # agreed first: every rank then skips or steps together, and a skipped step needs no all-reduce.
    # A non-finite or exploding loss or gradient (on any rank), or a step that would take syn_lr out
    # of (0, inf) (the same on every rank: the averaged gradient), never reaches the images
    agreed, stepped = all_ranks_true(bounded), False
    if agreed:
        all_reduce_mean_(syn.grads())  # the mean over the ranks' trajectories
        stepped = syn.step()
    skip = None if stepped else ('nonfinite' if not finite else 'max_loss' if not bounded
                                 else 'syn_lr' if agreed else 'other_rank')
    info = {k: mean_over_ranks(v) if torch.is_tensor(v) else v for k, v in info.items()}
    return Step(t, nu, mean_over_ranks(loss), info, skip)


# --lr_img and --lr_lr are divided by these in turn after a divergence; the first that a trial from the
# checkpoint shows to recover is the advice
ADVICE_FACTORS = (10, 100, 1000)


def smaller_steps(args: argparse.Namespace, factor: int) -> dict:
    return {'lr_img': args.lr_img / factor, **({'lr_lr': args.lr_lr / factor} if args.lr_lr > 0 else {})}


def trial_recovers(r: 'Run', args: argparse.Namespace, run_dir: str, steps: dict) -> tuple[bool, int, int]:
    """Run what `--resume run_dir` with these step sizes would run first: the checkpoint on disk restored
    into the live set and streams, then up to 2 x --max_skips iterations (nothing logged or written). It
    recovers if no --max_skips skips in a row come and the set stays finite. (recovers, iterations tried,
    the checkpoint's iteration). Collective under torchrun: every rank diverged at the same iteration."""
    ckpt = load_checkpoint(run_dir, r.d)
    state = restore(ckpt, run_dir, r.d, r.syn, r.cursor, r.gen, args.Iteration)
    r.syn.set_step_sizes(steps['lr_img'], steps.get('lr_lr', args.lr_lr))
    n, in_row = min(2 * args.max_skips, args.Iteration - state.it), 0
    for _ in range(n):
        step = iteration(r.syn, r.student, r.cursor.next(), r.gen, r.matching)
        in_row = 0 if step.skip is None else in_row + 1
        if in_row >= args.max_skips or not r.syn.finite():
            return False, n, state.it
    return True, n, state.it


def divergence_advice(r: 'Run', args: argparse.Namespace, run_dir: str, it: int, skip: str) -> Diverged:
    """The error after --max_skips skips in a row (or a set gone non-finite): the smallest change of --lr_img
    and --lr_lr that a trial from the checkpoint shows to recover, or, where none does, says so: a guess."""
    head = (f"{SKIP_WORDS[skip]} (it {it})" if skip == 'nonfinite_set' else
            f"{args.max_skips} steps in a row were skipped (it {it}; last: {SKIP_WORDS[skip]})")
    if not os.path.isfile(run_file(run_dir, CHECKPOINT_FILE)):
        return Diverged(f"{head}, before the first checkpoint; start the run again with a smaller --lr_img "
                        f"(e.g. {args.lr_img / 10:g}) or --lr_teacher")
    if r.d.is_main:
        tqdm.write(f"diverged at it {it}: trying smaller steps from {run_file(run_dir, CHECKPOINT_FILE)} ...")
    for factor in ADVICE_FACTORS:
        steps = smaller_steps(args, factor)
        recovers, n, start = trial_recovers(r, args, run_dir, steps)
        if recovers:
            return Diverged(f"{head}; the run is checkpointed at it {start}, and a trial of its next {n} iterations "
                            f"with a {factor}th of --lr_img and --lr_lr recovered: continue it with "
                            f"{resume_command(run_dir, r.d.world_size, **steps)}")
    guess = smaller_steps(args, ADVICE_FACTORS[-1] * 10)
    return Diverged(f"{head}; the run is checkpointed at it {start}, but trials of its next {n} iterations with "
                    f"--lr_img and --lr_lr divided by {', '.join(map(str, ADVICE_FACTORS))} diverged too, so what "
                    f"follows is a guess: the cause is likely a flag a resume cannot change (--lr_teacher "
                    f"{args.lr_teacher:g}, --syn_steps {args.syn_steps}, --expert_epochs {args.expert_epochs}): "
                    f"start a new run with a smaller --lr_teacher or fewer --syn_steps"
                    + (", or resume with a larger --max_loss" if skip == 'max_loss' else '')
                    + f"; or try {resume_command(run_dir, r.d.world_size, **guess)}")


# ---------------------------------------------------------------- evaluation

@dataclasses.dataclass(frozen=True)
class Evaluation:
    """How the set is scored during the run (the flags and the test set, fixed for the run)."""
    models: list[str]
    data_shape: tuple         # (channel, num_classes, im_size), the order of get_network
    test_x: torch.Tensor
    test_y: torch.Tensor
    val: tuple[torch.Tensor, torch.Tensor] | None   # the --valid images, also scored (None: no split)
    epochs: int
    num_eval: int
    seed: int
    lr_decay: str
    parallel: str
    accel: object
    to_pixels: object   # images -> [0, 1] pixels for the picture
    nrow: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, data, device: torch.device) -> 'Evaluation':
        return cls(models=args.eval_mode, data_shape=(data.channel, data.num_classes, data.im_size),
                   test_x=data.images_test.to(device), test_y=data.labels_test.to(device),
                   val=None if data.images_val is None else (data.images_val.to(device), data.labels_val.to(device)),
                   epochs=args.epoch_eval_train, num_eval=args.num_eval, seed=args.seed, lr_decay=args.lr_decay,
                   parallel=args.parallel_eval, accel=accel_for(device, channels_last=args.channels_last, bf16=args.bf16,
                                                                     tf32=args.tf32), to_pixels=data.to_pixels,
                   nrow=args.ipc if args.ipc > 1 else data.num_classes)


def best_key(ev: 'Evaluation') -> str:
    """What images_best.pt is selected on: the validation split where the run has one (--valid N), else the
    test set (MTT's statistic), and the name says which."""
    return 'best_mean_selected_on_val' if ev.val is not None else 'best_mean_selected_on_test'


def evaluate(it: int, syn: SyntheticSet, ev: Evaluation, state: LoopState, log: RunLog, run_dir: str) -> list:
    """Train ev.num_eval fresh networks per model on the set, log their test accuracy and the picture, and
    keep the set if the first model's mean is the best so far: on the validation split with --valid N, else
    on the test set (MTT's statistic; labelled so). Returns the results."""
    results = evaluate_set(ev.models, ev.data_shape, syn.images, syn.labels, ev.test_x, ev.test_y,
                           lr=syn.lr.item(), epochs=ev.epochs, num_eval=ev.num_eval, seed=ev.seed * 1000 + it,
                           lr_decay=ev.lr_decay, parallel=ev.parallel, accel=ev.accel, val=ev.val)
    metrics = {}
    for r in results:
        metrics[f'eval/{r.model}_mean'], metrics[f'eval/{r.model}_std'] = r.mean, r.std
        if r.val_accs:  # --valid: the accuracy to choose hyper-parameters on
            metrics[f'eval/{r.model}_val_mean'] = r.val_mean
        if r.max_acc_selected_on_test:  # --lr_decay ast: the authors' max over checks, chosen on the test set
            maxes = r.max_acc_selected_on_test
            metrics[f'eval/{r.model}_max_selected_on_test'] = sum(maxes) / len(maxes)
        tqdm.write(f"it {it}: {r}")
    score = results[0].val_mean if ev.val is not None else results[0].mean
    if score > state.best_acc:  # the set is finite: distill_loop stops at a step that leaves it otherwise
        state.best_acc, state.best_it = score, it
        save_best(run_dir, syn.images, syn.labels, syn.lr)
    metrics[f'eval/{best_key(ev)}'] = state.best_acc
    log.log(it, **metrics)
    log.save_grid(ev.to_pixels(syn.images.detach().cpu()), ev.nrow, GRID_NAME, it)
    return results


# ---------------------------------------------------------------- main

@dataclasses.dataclass
class Run:
    """The objects one run works with, built by `setup`."""
    d: Dist
    syn: SyntheticSet
    student: ReparamModule
    cursor: ExpertCursor     # --trajectories K > 1: a CursorGroup (one trajectory per student) ...
    gen: torch.Generator     # ... and a GeneratorGroup (student_streams)
    matching: Matching
    evaluation: Evaluation
    ckpt: dict | None   # the checkpoint to resume from
    record: dict        # what args.json keeps beside the flags (RECORD_KEYS)


def read_flags(argv) -> tuple[argparse.Namespace, str | None, dict, dict]:
    """(flags, run folder to resume or None, {flag: (old, new)} for each --resume override, the run's record
    of what was resolved and overridden before: split_record)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:  # the run's own flags (never wandb's), with the safe ones given here overriding them
        return (lambda run_dir, a, overrides, record: (a, run_dir, overrides, record))(
            *resume_args(parser, argv, args.resume, args.run_dir))
    return finalize_args(args), None, {}, {}


def run_shape(args: argparse.Namespace, data=None) -> RunShape:
    """The shapes of a run's iteration, for the memory plan: from the loaded data, or from the dataset's
    known metadata (--plan needs no data)."""
    if data is not None:
        channel, classes, im_size, tests = data.channel, data.num_classes, tuple(data.im_size), len(data.labels_test)
    else:
        channel, classes, im_size, tests = dataset_meta(args.dataset, args.subset, args.res)
    uses_middle = args.agg_middle_loss or args.adaptive_middle_loss  # either flag switches the terms on
    middle = tuple(intermediate_steps(args.syn_steps, args.expert_epochs, args.middle_steps)) if uses_middle else ()
    return RunShape(model=args.model or DEFAULT_MODEL[args.dataset], channel=channel, im_size=im_size,
                    num_classes=classes, ipc=args.ipc, batch_syn=args.batch_syn or classes * args.ipc,
                    syn_steps=args.syn_steps, middle_steps=middle, auto_steps=args.auto_steps, syn_mom=args.syn_mom,
                    dsa=args.dsa == 'True', weight_perturb=args.weight_perturb, num_test=tests,
                    eval_networks=1 if args.parallel_eval == 'loop' else args.num_eval,
                    trajectories=args.trajectories, states_mib=args.recompute_states_mib)


def resolve_unroll(args: argparse.Namespace, earlier: dict, data, files: list[str], device: torch.device,
                   d: Dist) -> dict:
    """The record's 'resolved': an explicit --unroll as given; auto planned on this device once, and kept
    by a resumed run unless it continues on another device (then planned again there)."""
    if args.unroll != 'auto':
        return {'unroll': args.unroll, 'device': str(device)}
    if earlier.get('unroll') in UNROLLS and earlier.get('device', str(device)) == str(device):
        return {**earlier, 'device': str(device)}
    all_ranks_true(True)  # the first collective: NCCL's buffers exist before the free memory is read
    choice = choose_unroll(make_plan(run_shape(args, data)), device, free_bytes(device),
                           expert_cache_bytes(files, args.expert_cache_mib))
    choice['unroll'] = 'bptt' if all_ranks_true(choice['bptt_fits']) else 'recompute'  # one mode on all ranks
    if d.is_main:
        print(describe_choice(choice))
    return {'unroll': choice['unroll'], 'unroll_plan': choice, 'device': str(device)}


def setup(args: argparse.Namespace, run_dir: str | None, device: torch.device, record: dict) -> Run:
    """Every check (before any work and before a run folder is made), then the set, streams and student."""
    check_writable(run_dir or args.run_dir, 'run folder' if run_dir else '--run_dir')
    if run_dir and from_env().is_main:  # rank 0 alone writes the run folder (under torchrun: before init)
        remove_stray_temps(run_dir)
    data, files = prepare(args)
    d, device = init_distributed(device)
    ckpt = load_checkpoint(run_dir, d) if run_dir else None
    resolved = resolve_unroll(args, record.get('resolved') or {}, data, files, device, d)
    gen = seed_everything(args.seed)
    expert_net = None
    if args.pix_init in ('kmeans', 'avg'):
        net = get_network(args.model, data.channel, data.num_classes, data.im_size)
        expert_net = final_expert_net(files, args.mct, net).to(device)
    images, labels = init_synthetic(data, args.ipc, args.pix_init, gen, expert_net=expert_net, seed=args.seed,
                                    features=args.kmeans_features)
    # the same start on every rank even if K-Means or the device differed; averaged steps keep it so
    syn = SyntheticSet(broadcast_(images.to(device)), labels.to(device), args.lr_teacher, lr_img=args.lr_img,
                       lr_lr=args.lr_lr)
    gen, cursor = student_streams(args.seed, d.rank, args.trajectories, gen, files, args.mct, args.expert_cache_mib)
    evaluation = Evaluation.from_args(args, data, device)
    student = ReparamModule(get_network(args.model, data.channel, data.num_classes, data.im_size).to(device))
    matching = Matching.from_args(args, len(syn), resolved['unroll'])
    return Run(d, syn, student, cursor, gen, matching, evaluation, ckpt, {**record, 'resolved': resolved})


def start_or_resume(r: Run, args: argparse.Namespace, run_dir: str | None,
                    overrides: dict) -> tuple[LoopState, RunLog | None, str]:
    """A new numbered run folder, or the checkpoint's state restored; rank 0 alone gets the log. args.json
    holds the flags as resolved, with the record (r.record) beside them."""
    log = None  # rank 0 alone writes metrics, wandb, images and checkpoints
    if r.ckpt is None:
        state = LoopState()
        if r.d.is_main:  # every check passed: a run killed in its first write left a folder nothing resumes
            remove_stray_temps_under(args.run_dir)
            run_dir = new_run_dir(args.run_dir, f'{args.dataset}-ipc{args.ipc}-{args.model}')
            save_args(run_dir, {**vars(args), **r.record})
            log = RunLog(run_dir, {**vars(args), **r.record}, wandb_mode=args.wandb, project=args.project)
        return state, log, broadcast_object(run_dir)  # one folder per run, named by rank 0
    state = restore(r.ckpt, run_dir, r.d, r.syn, r.cursor, r.gen, args.Iteration)
    r.syn.set_step_sizes(args.lr_img, args.lr_lr)
    if overrides:  # recorded with the iteration it took effect; a new streak of skips starts
        state.skips_in_row = 0
        earlier = r.record.get('resume_overrides', [])
        r.record['resume_overrides'] = (earlier if isinstance(earlier, list) else []) + [
            {'it': state.it, **{k: {'was': old, 'now': new} for k, (old, new) in overrides.items()}}]
    if r.d.is_main:
        save_args(run_dir, {**vars(args), **r.record})  # the overrides, and a plan made again on a new device
        log = RunLog(run_dir, {**vars(args), **r.record}, wandb_mode=args.wandb, project=args.project,
                     wandb_id=r.ckpt.get('wandb_id'))
        log.truncate_after(state.it - 1)
    return state, log, run_dir


def announce(run_dir: str, log: RunLog, d: Dist, resumed: bool, overrides: dict, trajectories: int = 1) -> None:
    print(f"{'resuming' if resumed else 'run folder:'} {run_dir}  (wandb: {log.mode})"
          + (f"  ({d.world_size} processes)" if d.world_size > 1 else '')
          + (f"  ({trajectories} trajectories per iteration{' per process' if d.world_size > 1 else ''})"
             if trajectories > 1 else '')
          + ('' if not resumed else f"; its {ARGS_FILE} flags are used"
             + (f", with {', '.join(f'--{k} {new}' for k, (_, new) in overrides.items())}" if overrides else '')))


def distill_loop(r: Run, args: argparse.Namespace, state: LoopState, log: RunLog | None, run_dir: str) -> None:
    """From state.it to --Iteration: evaluate every --eval_it, one iteration, log, checkpoint every --save_every."""
    d, n_finals = r.d, []  # ATT's N_opt since the last evaluation, for the histogram
    wandb_id = log.wandb_id if log else None
    bar = tqdm(range(state.it, args.Iteration), initial=state.it, total=args.Iteration, desc='distill',
               disable=not d.is_main)
    for it in bar:
        if it % args.eval_it == 0:
            if d.is_main:  # the other ranks go on with their unroll and wait in the next collective
                evaluate(it, r.syn, r.evaluation, state, log, run_dir)
                log.histogram('att/n_opt', n_finals, it)
            n_finals.clear()
        step = iteration(r.syn, r.student, r.cursor.next(), r.gen, r.matching)
        n_finals.append(step.info['n_final'])
        state.record(it, stepped=step.skip is None)
        if d.is_main:
            log.log(it, loss=step.loss.item(), syn_lr=r.syn.lr.item(), start_epoch=step.t, nu=step.nu,
                    skipped=state.skipped, **({'skip_reason': step.skip} if step.skip else {}), **step.info)
            bar.set_postfix(loss=f'{step.loss.item():.4f}', syn_lr=f'{r.syn.lr.item():.2e}', skipped=state.skipped)
        finite = r.syn.finite()  # a step that overflowed the images: the last checkpoint stays as it is
        if state.skips_in_row >= args.max_skips or not finite:
            if finite:
                save_checkpoint(run_dir, d, r.syn, state, r.cursor, r.gen, wandb_id)
            raise divergence_advice(r, args, run_dir, it, step.skip or 'nonfinite_set')
        if state.it % args.save_every == 0:
            save_checkpoint(run_dir, d, r.syn, state, r.cursor, r.gen, wandb_id)


def finish(r: Run, state: LoopState, log: RunLog | None, run_dir: str, iterations: int) -> None:
    """The last evaluation, checkpoint and final.json. A crash after the last checkpoint but before
    final.json resumes here and finishes. The set is finite here: distill_loop stops at a step that is not,
    restore refuses such a checkpoint, and save_checkpoint (before final.json) asserts it."""
    results = evaluate(iterations, r.syn, r.evaluation, state, log, run_dir) if r.d.is_main else None
    save_checkpoint(run_dir, r.d, r.syn, state, r.cursor, r.gen, log.wandb_id if log else None)
    if r.d.is_main:
        save_final(run_dir, r.syn.images, r.syn.labels, r.syn.lr)  # before final.json: a crash between resumes here
        key = best_key(r.evaluation)
        summary = {'final_mean': results[0].mean, 'final_model': results[0].model, key: state.best_acc,
                   'best_it': state.best_it, 'skipped_steps': state.skipped, 'syn_lr': r.syn.lr.item()}
        atomic_write_json(summary, run_file(run_dir, FINAL_FILE))
        print(f"done: final set {100 * results[0].mean:.2f}% ({results[0].model}); best {100 * state.best_acc:.2f}% "
              f"at it {state.best_it} ({key.replace('best_mean_', '').replace('_', ' ')}); {run_dir}")
        log.finish()


@cli_entry
def main(argv=None):
    args, run_dir, overrides, record = read_flags(argv)
    if run_dir and os.path.exists(run_file(run_dir, FINAL_FILE)):  # nothing to do: the folder stays as it is
        print(f"{run_dir} has finished ({FINAL_FILE}); nothing to resume"
              + (f" (ignored: {', '.join('--' + k for k in overrides)})" if overrides else ''))
        return run_dir
    check_flags(args, FLAG_DOMAINS)  # every check runs before any work and before a run folder is made
    check_trajectories(args)
    device = pick_device(args.device)
    set_deterministic(args.deterministic)
    if args.plan:  # needs no data, buffers or run folder: the dataset's shape is known
        chosen = (record.get('resolved') or {}).get('unroll') if args.unroll == 'auto' else None
        try:
            print(describe_run(make_plan(run_shape(args)), chosen or args.unroll, device))
        except ValueError as e:
            raise UsageError(f"--plan: {e}") from None
        return None
    r = setup(args, run_dir, device, record)
    resumed = r.ckpt is not None
    state, log, run_dir = start_or_resume(r, args, run_dir, overrides)
    if r.d.is_main:
        announce(run_dir, log, r.d, resumed, overrides, args.trajectories)
    distill_loop(r, args, state, log, run_dir)
    finish(r, state, log, run_dir, args.Iteration)
    cleanup()
    return run_dir


if __name__ == '__main__':
    main()
