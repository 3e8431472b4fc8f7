"""How a distill.py run continues: the loop's counters, each rank's random streams, and the checkpoint
that holds them with the synthetic set (--resume; one file, written atomically by rank 0).
"""
import dataclasses
import math
import os
import shlex

import torch

from trajmatch.cli import UsageError, WriteError
from trajmatch.distributed import Dist, all_gather_objects, barrier, rank_seed
from trajmatch.runlog import ARGS_FILE, CHECKPOINT_FILE, run_file
from trajmatch.synthetic import SyntheticSet
from trajmatch.trajectory_io import ExpertCursor, expert_loader
from trajmatch.files import atomic_torch_save
from trajmatch.runtime import rng_state, seed_everything, set_rng_state


def resume_command(run_dir: str, world_size: int, **flags) -> str:
    how = f"torchrun --nproc_per_node={world_size} distill.py" if world_size > 1 else "python distill.py"
    return ' '.join([how, '--resume', shlex.quote(run_dir)] + [f"--{k} {v:g}" for k, v in flags.items()])


# ---------------------------------------------------------------- per-rank random streams

def rank_streams(seed: int, rank: int, init_gen: torch.Generator, files: list[str],
                 mct: bool, cache_mib: float = 2048) -> tuple[torch.Generator, ExpertCursor]:
    """The generator (start epochs, batches, DSA, perturbation) and expert cursor of one rank.

    Rank 0 continues the generator that drew the initial images and walks the experts from --seed,
    exactly as a plain run; rank r > 0 reseeds everything from rank_seed(seed, r) after the shared
    initialisation, so ranks match different trajectories from the same images.
    """
    gen = init_gen if rank == 0 else seed_everything(rank_seed(seed, rank))
    return gen, ExpertCursor(files, rank_seed(seed, rank), loader=expert_loader(mct), cache_mib=cache_mib)


def student_streams(seed: int, rank: int, trajectories: int, init_gen: torch.Generator, files: list[str],
                    mct: bool, cache_mib: float = 2048):
    """The streams of one rank's `trajectories` students (distill.py --trajectories K).

    K = 1: rank_streams, the plain generator and cursor (the run is the one before --trajectories, bit
    for bit). K > 1: student k of rank r is virtual rank v = r K + k and draws what torchrun rank v of a
    K = 1 run draws: the generator and cursor of rank_seed(seed, v) (v = 0: the generator that drew the
    images). The process's global RNGs stay as --seed set them (no iteration draws from them), and the
    K cursors read the files through one cache. Returns (GeneratorGroup, CursorGroup).
    """
    if trajectories == 1:
        return rank_streams(seed, rank, init_gen, files, mct, cache_mib)
    ranks = range(rank * trajectories, (rank + 1) * trajectories)
    gens = [init_gen if v == 0 else torch.Generator().manual_seed(rank_seed(seed, v)) for v in ranks]
    first = ExpertCursor(files, rank_seed(seed, ranks[0]), loader=expert_loader(mct), cache_mib=cache_mib)
    others = [ExpertCursor(files, rank_seed(seed, v), loader=first.loader, cache_mib=0, shared=first)
              for v in ranks[1:]]
    return GeneratorGroup(gens), CursorGroup([first] + others)


class GeneratorGroup:
    """K students' generators where one generator goes (the checkpoint's 'generator': a [K, state] tensor)."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def get_state(self) -> torch.Tensor:
        return torch.stack([g.get_state() for g in self.generators])

    def set_state(self, state: torch.Tensor) -> None:
        if not (torch.is_tensor(state) and state.dim() == 2 and len(state) == len(self.generators)):
            raise ValueError(f"generator states of shape {tuple(getattr(state, 'shape', ()))}, this run has "
                             f"{len(self.generators)} students")
        for g, s in zip(self.generators, state):
            g.set_state(s.clone())  # a row is a view at an offset: torch 2.14's set_state crashed on one (segfault)


class CursorGroup:
    """K students' expert cursors where one cursor goes: next() is one trajectory per student."""

    def __init__(self, cursors: list[ExpertCursor]):
        self.cursors = cursors

    def next(self) -> list:
        return [c.next() for c in self.cursors]

    def state_dict(self) -> dict:
        return {'students': [c.state_dict() for c in self.cursors]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get('students') if isinstance(state, dict) else None
        if not (isinstance(states, list) and len(states) == len(self.cursors)):
            raise ValueError(f"the checkpoint's cursors are not {len(self.cursors)} students'")
        for c, s in zip(self.cursors, states):
            c.load_state_dict(s)


def rank_state(cursor: ExpertCursor, gen: torch.Generator, device: torch.device) -> dict:
    """What one rank needs to continue its own random streams after --resume (its own device's only)."""
    return {'cursor': cursor.state_dict(), 'generator': gen.get_state(), 'rng': rng_state(device)}


def restore_rank_state(ckpt: dict, d: Dist, cursor: ExpertCursor, gen: torch.Generator,
                       device: torch.device) -> None:
    """Rank 0's streams are the checkpoint's top-level keys (as in a one-process checkpoint);
    rank r > 0's are ckpt['other_ranks'][r - 1]."""
    mine = ckpt if d.rank == 0 else ckpt['other_ranks'][d.rank - 1]
    cursor.load_state_dict(mine['cursor'])
    gen.set_state(mine['generator'])
    set_rng_state(mine['rng'], device)


# ---------------------------------------------------------------- checkpoint

@dataclasses.dataclass
class LoopState:
    """The loop's counters; saved in the checkpoint as a plain dict."""
    it: int = 0               # iterations done
    best_acc: float = -1.0    # best mean accuracy of the first --eval_mode so far (on the test set; --valid: validation)
    best_it: int = -1
    skipped: int = 0          # steps refused so far (see SKIP_WORDS)
    skips_in_row: int = 0

    def record(self, it: int, stepped: bool) -> None:
        self.it = it + 1
        self.skipped += not stepped
        self.skips_in_row = 0 if stepped else self.skips_in_row + 1


CHECKPOINT_KEYS = ('images', 'syn_lr', 'labels', 'opt_img', 'opt_lr', 'cursor', 'generator', 'rng', 'state')
STATE_KEYS = tuple(f.name for f in dataclasses.fields(LoopState))


def load_checkpoint(run_dir: str, d: Dist) -> dict:
    """The run's checkpoint (on the CPU); it holds each rank's streams, so it continues only with as
    many processes."""
    path = run_file(run_dir, CHECKPOINT_FILE)
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


def nonfinite_part(obj, where: str = '') -> str | None:
    """The first tensor or number inside `obj` (dicts, lists) that is not finite, by its place, else None."""
    if torch.is_tensor(obj):
        return where if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()) else None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = nonfinite_part(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def check_contents(ckpt: dict, syn: SyntheticSet, path: str) -> None:
    """What a checkpoint that loads may still hold wrongly: NaN or infinite images, syn_lr or optimiser
    states (a run continued from them would skip every step and end with NaN pixels), a syn_lr <= 0, or
    labels that are not this run's. UsageError naming the part."""
    for key in ('images', 'syn_lr', 'opt_img', 'opt_lr'):
        bad = nonfinite_part(ckpt[key], key)
        if bad is not None:
            raise UsageError(f"{path}: {bad} holds NaN or infinite values; the checkpoint is damaged or was "
                             f"written by a diverged run: restore an earlier copy or start a new run")
    lr = ckpt['syn_lr']
    if not (torch.is_tensor(lr) and lr.numel() == 1 and float(lr) > 0):
        raise UsageError(f"{path}: syn_lr {lr!r} is not one number > 0; restore the run's files or start a new run")
    labels = ckpt['labels']
    mine = syn.labels.cpu()
    if not (torch.is_tensor(labels) and labels.shape == mine.shape and not labels.is_floating_point()
            and torch.equal(labels.long(), mine.long())):
        raise UsageError(f"{path}: its labels are not this run's ({tuple(getattr(labels, 'shape', ()))} "
                         f"{getattr(labels, 'dtype', type(labels).__name__)}); it belongs to another run: restore "
                         f"it or start a new run")


def restore(ckpt: dict, run_dir: str, d: Dist, syn: SyntheticSet, cursor: ExpertCursor, gen: torch.Generator,
            iterations: int) -> LoopState:
    """Put the checkpoint's set, optimisers and random states in place and return its loop state; one that
    does not fit this run is a UsageError before any iteration."""
    path = run_file(run_dir, CHECKPOINT_FILE)
    check_contents(ckpt, syn, path)
    try:
        syn.load_state_dict(ckpt)
        restore_rank_state(ckpt, d, cursor, gen, syn.images.device)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{path} does not fit this run ({type(e).__name__}: {e}); it belongs to another run: "
                         f"restore it or start a new run") from None
    state = LoopState(**{k: ckpt['state'][k] for k in STATE_KEYS})
    if not (isinstance(state.it, int) and 0 <= state.it <= iterations):
        raise UsageError(f"{path} is at iteration {state.it!r}, outside 0..{iterations} of its {ARGS_FILE}; "
                         f"restore the run's files or start a new run")
    return state


def save_checkpoint(run_dir: str, d: Dist, syn: SyntheticSet, state: LoopState, cursor: ExpertCursor,
                    gen: torch.Generator, wandb_id: str | None) -> None:
    """Collective: every rank hands its streams to rank 0, which writes; all leave once it is on disk."""
    if not syn.finite():  # the caller checks first (distill.py); never a checkpoint a resume would refuse
        raise RuntimeError('save_checkpoint: the synthetic set is not finite')
    ranks = all_gather_objects(rank_state(cursor, gen, syn.images.device))
    if d.is_main:
        path = run_file(run_dir, CHECKPOINT_FILE)
        try:
            atomic_torch_save({**syn.state_dict(), **ranks[0], 'other_ranks': ranks[1:], 'world_size': d.world_size,
                               'state': dataclasses.asdict(state), 'wandb_id': wandb_id}, path)
        except WriteError as e:
            later = (f"then continue with {resume_command(run_dir, d.world_size)}" if os.path.exists(path)
                     else "no checkpoint was written yet: start the run again")
            raise WriteError(f"{e}; {later}") from None
    barrier()
