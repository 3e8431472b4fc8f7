"""Distill a dataset by matching expert training trajectories (MTT, SPEC 5).

    python distill.py --dataset Digits --ipc 10                 # a new numbered folder under runs/
    python distill.py --resume runs/003-Digits-ipc10-ConvNetD2  # continue it to the same --Iteration
    torchrun --nproc_per_node=K distill.py ...                  # K trajectories per iteration
Defaults are the Digits quickstart; buffer.sh / distill.sh presets set the paper's rows.

Under torchrun every process holds the same synthetic set; each samples its own expert, start epoch
and augmentations, and the image and syn_lr gradients are averaged before the step. Rank 0 alone
writes the run folder and evaluates. One process is the plain run, bit for bit.
"""
import argparse
import os

import torch
from tqdm import tqdm

from data import DATASETS, DEFAULT_MODEL, SUBSETS, DataError, check_dataset, load_dataset
from distributed import (Dist, all_gather_objects, all_ranks_true, all_reduce_mean_, barrier, broadcast_,
                         broadcast_object, cleanup, init_distributed, mean_over_ranks, rank_seed)
from accel import accel_from_args, add_accel_flags
from evaluation import LR_DECAYS, PARALLEL_EVAL, evaluate_set, random_real
from matching import ATT_METRICS, UNROLLS, Targets, match_and_backward
from memplan import auto_unroll, describe_choice, describe_for_args
from networks import MODELS, get_network
from reparam_module import ReparamModule
from runlog import WANDB_MODES, RunLog, latest_run_dir, load_args, new_run_dir, save_args
from ast_components import (balance_weight, intermediate_betas, intermediate_steps, kmeans_init,
                            perturb_start)
from mct import CompressedTrajectory, compressed_dir, load_compressed
from reparam_module import load_flat_
from trajectory_io import ExpertCursor, buffer_dir, load_trajectory_tensors, validate_buffers
from utils import UsageError, atomic_torch_save, atomic_write_json, fail, pick_device, rng_state, seed_everything, set_rng_state


# ---------------------------------------------------------------- flags (defaults: Digits quickstart)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    # AST components (SPEC 6), each independent of the others
    a('--balance_loss', action='store_true', help='AST: scale the inner CE by ν(t)')
    a('--balance_base', type=float, default=5.0, help='log base of ν (authors\' code: 5)')
    a('--agg_middle_loss', action='store_true', help='AST: add intermediate matching terms θ*_{t+i} at step floor(iN/M)')
    a('--adaptive_middle_loss', action='store_true', help='β_i = (i+1)/(1+M) instead of 1')
    a('--weight_perturb', action='store_true', help='AST: start the student at θ*_t + ρ d (per-filter normalised d)')
    a('--perturb_rho', type=float, default=0.1)
    a('--perturb_variant', default='paper', choices=['paper', 'code'])
    # MCT (SPEC 8)
    a('--mct', action='store_true', help='read compressed buffers ({buffer}/mct{K}, compress_buffers.py) and '
                                        'sample real-valued start epochs')
    a('--mct_k', type=int, default=4, help='waypoints of the compressed buffers')
    a('--max_experts', type=int, default=None, help='use only the first K expert files')
    a('--expert_cache_mib', type=float, default=2048, help='keep loaded expert files in memory up to this (MiB)')
    a('--max_skips', type=int, default=10, help='stop after this many non-finite losses in a row')
    # evaluation
    a('--eval_mode', nargs='+', default=None, choices=list(MODELS), help='architectures to evaluate (default: --model)')
    a('--eval_it', type=int, default=100, help='evaluate every this many iterations (and at the end)')
    a('--num_eval', type=int, default=5, help='networks per architecture per evaluation')
    a('--epoch_eval_train', type=int, default=1000, help='epochs to train each evaluation network')
    a('--lr_decay', default='mtt', choices=list(LR_DECAYS), help='eval lr schedule: mtt x0.1 at E//2+1, ast x0.5')
    a('--parallel_eval', default='auto', choices=PARALLEL_EVAL,
      help='stack: train the num_eval networks together (vmap); loop: one at a time; auto: stack on CUDA, '
           'on CPU while the stacked batch stays small (same networks either way)')
    # run
    a('--seed', type=int, default=0)
    a('--device', default='auto')
    a('--run_dir', default='runs', help='numbered run folders go here')
    a('--save_every', type=int, default=50, help='checkpoint every this many iterations')
    a('--resume', default=None, help="run folder to continue, or 'latest'")
    a('--wandb', default='auto', choices=WANDB_MODES, help='auto: WANDB_MODE, else online if logged in, else offline')
    a('--project', default='ast-distill', help='wandb project')
    add_accel_flags(p)  # --channels_last/--bf16 reach evaluation only; the unroll is always fp32
    return p


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    args.model = args.model or DEFAULT_MODEL[args.dataset]
    args.eval_mode = args.eval_mode or [args.model]
    return args


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
    """Every check that can fail fast: data, model/size, ipc, buffers. Returns (data, expert files)."""
    check_dataset(args.dataset, args.data_path, subset=args.subset)
    folder = buffer_dir(args.buffer_path, args.dataset, args.model, zca=args.zca, subset=args.subset, res=args.res)
    if not os.path.isdir(folder):
        raise UsageError(f"no expert buffers at {folder}; run buffer.py with the same --dataset/--model/--zca "
                         f"first (e.g. bash buffer.sh), or point --buffer_path at them")
    data = load_dataset(args.dataset, args.data_path, zca=args.zca, subset=args.subset, res=args.res)
    nets = [get_network(m, data.channel, data.num_classes, data.im_size)  # ValueError if the size does not fit
            for m in [args.model] + args.eval_mode]
    smallest = min(len(idx) for idx in data.indices_per_class())
    if args.ipc > smallest:
        raise UsageError(f"--ipc {args.ipc} is larger than the smallest class ({smallest} images); lower --ipc")
    if args.mct:
        folder = compressed_dir(folder, args.mct_k)
        if not os.path.isdir(folder):
            raise UsageError(f"no compressed buffers at {folder}; run compress_buffers.py --k {args.mct_k} "
                             f"with the same --dataset/--model/--zca/--buffer_path first")
    files = validate_buffers(folder, dataset=args.dataset, model=args.model,
                             param_shapes=[p.shape for p in nets[0].parameters()],
                             needed_epochs=args.max_start_epoch + args.expert_epochs, compressed=args.mct)
    return data, files[:args.max_experts]


# ---------------------------------------------------------------- expert points and AST pieces

def trajectory_loader(mct: bool):
    return load_compressed if mct else load_trajectory_tensors


def sample_start(max_start_epoch: int, continuous: bool, generator: torch.Generator) -> float | int:
    """t ~ U{0..T+-1} (MTT), or t ~ U[0, T+) real-valued on a compressed trajectory (MCT)."""
    if continuous:
        return float(torch.rand((), generator=generator)) * max_start_epoch
    return int(torch.randint(0, max_start_epoch, (1,), generator=generator))


def point(trajectory, s) -> torch.Tensor:
    """θ*(s): a stored snapshot, or MCT's convexified θ(s) for real s."""
    return trajectory.at(s) if isinstance(trajectory, CompressedTrajectory) else trajectory[s]


def expert_targets(trajectory, t, *, syn_steps: int, expert_epochs: int, middle: bool, adaptive: bool) -> Targets:
    """θ*_t, θ*_{t+M} and, with AST's intermediate matching, (n_i, θ*_{t+i}, β_i) for i = 1..M-1."""
    mids = []
    if middle:
        steps, betas = intermediate_steps(syn_steps, expert_epochs), intermediate_betas(expert_epochs, adaptive)
        mids = [(n, point(trajectory, t + i), beta) for i, (n, beta) in enumerate(zip(steps, betas), start=1)]
    return Targets(point(trajectory, t), point(trajectory, t + expert_epochs), mids)


def final_expert_net(files: list[str], mct: bool, net: torch.nn.Module) -> torch.nn.Module:
    """The first expert at its last epoch, for K-Means features."""
    traj = trajectory_loader(mct)(files[0])[0]
    load_flat_(net, point(traj, traj.num_epochs if mct else -1))
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


def load_checkpoint(run_dir: str, d: Dist) -> dict:
    """The run's checkpoint (on the CPU); it holds each rank's streams, so it continues only with as
    many processes."""
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pt'), map_location='cpu', weights_only=True)
    saved = ckpt.get('world_size', 1)  # checkpoints from before torchrun support: one process
    if saved != d.world_size:
        how = f"torchrun --nproc_per_node={saved} distill.py" if saved > 1 else "python distill.py"
        raise UsageError(f"{run_dir} was checkpointed by {saved} process(es), this is {d.world_size}; "
                         f"resume it with {how} --resume {run_dir}")
    return ckpt


# ---------------------------------------------------------------- main loop

def main(argv=None):
    args = build_parser().parse_args(argv)
    plan_only = args.plan
    if args.resume:
        run_dir = latest_run_dir(args.run_dir) if args.resume == 'latest' else args.resume
        if not run_dir or not os.path.exists(os.path.join(run_dir, 'checkpoint.pt')):
            fail(f"--resume {args.resume}: no checkpoint.pt in {run_dir}; give a run folder of distill.py")
        saved = vars(build_parser().parse_args([]))  # defaults for flags newer than the run
        saved.update(load_args(run_dir))
        args = argparse.Namespace(**saved)  # the run's own flags, never wandb's
    else:
        args = finalize_args(args)
        run_dir = None
    if plan_only:  # before any data, buffer or run folder
        try:
            print(describe_for_args(args, pick_device(args.device)))
        except (DataError, ValueError) as e:
            fail(str(e))
        return None
    try:
        device = pick_device(args.device)
        data, files = prepare(args)
        d, device = init_distributed(device)
        ckpt = load_checkpoint(run_dir, d) if run_dir else None
    except (DataError, UsageError, ValueError) as e:
        fail(str(e))
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
    if ckpt is not None:  # resume: restore everything the loop reads (copy_, load_state_dict: onto the device)
        with torch.no_grad():
            syn_images.copy_(ckpt['images'])
            syn_lr.copy_(ckpt['syn_lr'])
        opt_img.load_state_dict(ckpt['opt_img'])
        opt_lr.load_state_dict(ckpt['opt_lr'])
        restore_rank_state(ckpt, d, cursor, gen)
        state = ckpt['state']
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
              + ('' if ckpt is None else "; its args.json flags are used"))

    def checkpoint():
        """Collective: every rank hands its streams to rank 0, which writes; all leave once it is on disk."""
        ranks = all_gather_objects(rank_state(cursor, gen))
        if d.is_main:
            atomic_torch_save({'images': syn_images.detach().cpu(), 'syn_lr': syn_lr.detach().cpu(),
                               'labels': syn_labels.cpu(), 'opt_img': opt_img.state_dict(),
                               'opt_lr': opt_lr.state_dict(), **ranks[0], 'other_ranks': ranks[1:],
                               'world_size': d.world_size, 'state': state, 'wandb_id': log.wandb_id},
                              os.path.join(run_dir, 'checkpoint.pt'))
        barrier()

    def evaluate(it: int):
        results = evaluate_set(args.eval_mode, data_shape, syn_images, syn_labels, test_x, test_y,
                               lr=syn_lr.item(), epochs=args.epoch_eval_train, num_eval=args.num_eval,
                               seed=args.seed * 1000 + it, lr_decay=args.lr_decay, parallel=args.parallel_eval,
                               accel=accel)
        metrics = {}
        for r in results:
            metrics[f'eval/{r.model}_mean'], metrics[f'eval/{r.model}_std'] = r.mean, r.std
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
                                 middle=args.agg_middle_loss, adaptive=args.adaptive_middle_loss)
        w0 = targets.start
        if args.weight_perturb:
            w0 = perturb_start(w0, param_shapes, rho=args.perturb_rho, generator=gen, variant=args.perturb_variant)
        nu = balance_weight(t, args.max_start_epoch, base=args.balance_base) if args.balance_loss else 1.0
        opt_img.zero_grad(set_to_none=True)
        opt_lr.zero_grad(set_to_none=True)
        loss, info = match_and_backward(student, syn_images, syn_labels, syn_lr, w0, targets,
                                        syn_steps=args.syn_steps, batch_syn=batch_syn, generator=gen,
                                        syn_mom=args.syn_mom, use_dsa=args.dsa == 'True', loss_weight=nu,
                                        unroll_mode=args.unroll, auto_steps=args.auto_steps,
                                        att_metric=args.att_metric)
        n_finals.append(info['n_final'])
        finite = bool(torch.isfinite(loss)) and syn_images.grad is not None and bool(
            torch.isfinite(syn_images.grad).all() and torch.isfinite(syn_lr.grad))
        # agreed first: every rank then skips or steps together, and a skipped step needs no all-reduce
        if all_ranks_true(finite):  # a non-finite loss or gradient (on any rank) never reaches the images
            all_reduce_mean_([syn_images.grad, syn_lr.grad])  # the mean over the ranks' trajectories
            opt_img.step()
            opt_lr.step()
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
                    **info)
            bar.set_postfix(loss=f'{loss.item():.4f}', syn_lr=f'{syn_lr.item():.2e}', skipped=state['skipped'])
        if state['skips_in_row'] >= args.max_skips:
            checkpoint()
            fail(f"matching loss or its gradient was non-finite {args.max_skips} iterations in a row (it {it}); "
                 f"lower --lr_img / --lr_lr or --syn_steps, then --resume {run_dir}", code=3)
        if state['it'] % args.save_every == 0:
            checkpoint()
    finished_before = broadcast_object(os.path.exists(os.path.join(run_dir, 'final.json')))  # rank 0's view
    if state['it'] == args.Iteration and not finished_before:
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
