"""Study cells: every result a study's tables are made from is one cell, computed by one idempotent command.

A cell is one piece of work: an expert recipe's buffers, one distillation (its scores, in-loop curve and final
set), one baseline, one cross-architecture network, one recovered set. Its result lives in its own file,
written atomically (temp file + rename):

    <root>/cells/<digest>.json   {"key": [...], "value": {...}}, digest = sha1(json.dumps(key))[:16]
    <root>/sets/<digest>.pt      a distillation's final images, labels and lr (same digest as its cell)
    <root>/buffers/<recipe>/...  an expert recipe's buffers (buffer.py's own files; that cell has no .json)

Running a cell whose result exists does nothing. Nothing is shared between processes but these files, so any
number of cell commands may run at once, on any job runner: the study modules (experiments.py, fmnist.py)
enumerate their cells with `--list` (see experiments.py for the commands).

Dependencies: a study enumerates only the cells whose inputs exist (a distillation once its experts are on
disk, and on Fashion-MNIST once the hyper-parameter grid it takes its flags from is complete; a
cross-architecture network once its distilled set exists), so `--list` prints what can run now, and running
its output until it prints nothing computes the whole study. A cell command whose inputs are missing refuses
to run (it is not among the study's cells yet).
"""
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import buffer
import compress_buffers
import distill
from trajmatch.data import load_dataset
from trajmatch.evaluation import evaluate_set
from trajmatch.cli import UsageError
from trajmatch.files import atomic_torch_save, atomic_write_json, json_text, remove_stray_temps
from trajmatch.runlog import CHECKPOINT_FILE, METRICS_FILE, run_file
from trajmatch.trajectory_io import buffer_dir, expert_done, expert_files, read_meta

MISSING = {'missing': True}  # Study.get's answer for a cell not computed yet
EVAL_PROTOCOL = 'mtt-exact'  # part of every cell key: cells scored under an older protocol are computed again
AST_STUDENT = ['--syn_mom', '0.9', '--perturb_variant', 'code']    # the AST authors' student (as the AST presets)
AST_ALL = ['--pix_init', 'kmeans', '--balance_loss', '--agg_middle_loss', '--weight_perturb']  # every AST component

EXPERTS = ['--num_experts', '10', '--train_epochs', '20']          # Digits: per expert recipe
# buffer.py flags (docs/method.md, section 1), as the cells' keys hold them: written before issue 26, when
# `--optim sgdmom`, a bare `--gp` and a bare `--loss_decay` meant the paper's versions. The keys stay (so
# results/cells stays valid) and buffer_command spells them as buffer.py reads them now.
RECIPES = {
    'SGD (MTT)': [],
    'SGD + momentum': ['--optim', 'sgdmom'],
    'SGD + momentum + gp + loss decay (AST paper)': ['--optim', 'sgdmom', '--gp', '--loss_decay'],
    'AST code recipe (sgdmom_code + gp + loss decay, code variants: the AST presets)':
        ['--optim', 'sgdmom_code', '--gp', 'code', '--loss_decay', 'code'],
}
BASE = ['--syn_steps', '20', '--expert_epochs', '2', '--max_start_epoch', '10', '--lr_img', '30',
        '--lr_lr', '1e-6', '--lr_teacher', '0.01']  # digits_ipc1's flags but lr_lr 1e-6: at 1e-5 every AST-expert run diverged


def buffer_command(flags: list[str]) -> list[str]:
    """A recipe's flags as written in the cell keys -> the same recipe in today's buffer.py spelling: `sgdmom`
    -> `sgdmom_paper`, a bare `--gp` / `--loss_decay` -> `paper` (before issue 26 those meant the paper's)."""
    out = []
    for i, flag in enumerate(flags):
        if flag == 'sgdmom' and i and flags[i - 1] == '--optim':
            flag = 'sgdmom_paper'
        out.append(flag)
        if flag in ('--gp', '--loss_decay') and (i + 1 == len(flags) or flags[i + 1].startswith('--')):
            out.append('paper')
    return out


def digest(key: list) -> str:
    """The cell's file name (and its set's): the first 16 hex digits of sha1(json.dumps(key))."""
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]


def bad_cell_file(path: str, what: str) -> UsageError:
    """A cell's (or a set's) file on disk that is not what the study wrote: one line naming it, and the fix."""
    return UsageError(f"{path} {what}: it was damaged or edited; delete it and run the study again (the cell is "
                      f"computed again)")


@dataclass
class Cell:
    """One unit of a study: compute() writes its result (atomically); done() says whether it is there."""
    key: list
    compute: Callable[[], None]
    done: Callable[[], bool]

    @property
    def digest(self) -> str:
        return digest(self.key)

    def run(self) -> bool:
        """Compute the cell unless its result exists; whether it computed."""
        if self.done():
            return False
        print(f'cell {self.digest}: {json.dumps(self.key)}', flush=True)
        self.compute()
        return True


def unique(cells) -> list[Cell]:
    """The cells once each (by digest), in order."""
    seen, out = set(), []
    for c in cells:
        if c.digest not in seen:
            seen.add(c.digest)
            out.append(c)
    return out


def compute_missing(enumerate_cells: Callable[[], object]) -> int:
    """Compute every missing cell, in order, until the study has none left (the enumeration is lazy, so a cell
    whose inputs an earlier one of the same pass computed is reached in that pass); how many were computed."""
    total = 0
    while True:
        done = 0
        seen = set()
        for c in enumerate_cells():
            if c.digest not in seen:
                seen.add(c.digest)
                done += c.run()
        total += done
        if not done:
            return total


def missing_cells(enumerate_cells: Callable[[], object]) -> list[Cell]:
    """The cells that can run now (inputs there) and have no result yet, once each, in order."""
    return [c for c in unique(enumerate_cells()) if not c.done()]


def run_one(enumerate_cells: Callable[[], object], wanted: str) -> str:
    """`--cell DIGEST`: compute that cell unless it exists. 'computed', 'exists', or 'unknown' (no such cell
    among those whose inputs exist)."""
    for c in enumerate_cells():
        if c.digest == wanted:
            return 'computed' if c.run() else 'exists'
    return 'unknown'


# ---------------------------------------------------------------- runs

@dataclass(frozen=True)
class Setting:
    """What every expert and distillation of one study shares."""
    dataset: str
    model: str
    data: tuple[str, ...] = ()           # more data flags of buffer.py and distill.py (--data_path, --valid)
    experts: tuple[str, ...] = tuple(EXPERTS)
    recipes: dict = field(default_factory=lambda: RECIPES)
    eval_epochs: int = 1000              # E of the evaluation networks (MTT's schedule: E+1 epochs)
    valid: int = 0                       # held-out validation images (must match --valid in `data`)
    data_path: str = 'data'
    curve_points: int = 0                # in-loop evaluations (1 network) per run besides it 0: the curves
    # distillation seed s is scored by networks seeded first + stride * s + i (i < num_eval). Digits' cached
    # tables used stride 1 (seeds s and s + 1 share networks); kept so results/cells stay valid
    eval_seed_stride: int = 1

    def recipe_path(self, root: str, recipe: str) -> str:
        return os.path.join(root, 'buffers', recipe.split(' (')[0].replace(' + ', '+').replace(' ', '_'))

    @property
    def num_experts(self) -> int:
        flags = list(self.experts)
        return int(flags[flags.index('--num_experts') + 1]) if '--num_experts' in flags else 5  # buffer.py's default


DIGITS = Setting('Digits', 'ConvNetD2')


class Study:
    """A study's cells under `root`: reading them (get, run, score, ...) and making the cells that compute them."""

    def __init__(self, root: str, seeds: int, num_eval: int, iterations: dict[int, int],
                 setting: Setting = DIGITS, base: dict[int, list[str]] | None = None):
        self.root, self.seeds, self.num_eval, self.iterations = root, seeds, num_eval, iterations
        self.setting = setting
        self.base = base or {ipc: BASE for ipc in iterations}  # distill flags every run of that ipc starts from
        self.cells_dir = os.path.join(root, 'cells')
        self._values: dict[str, object] = {}
        self._data = None

    # ------------------------------------------------ cell files

    def cell_path(self, key: list) -> str:
        return os.path.join(self.cells_dir, digest(key) + '.json')

    def get(self, key: list):
        """The cell's value, or MISSING."""
        k = json.dumps(key)
        if k not in self._values:
            path = self.cell_path(key)
            try:
                with open(path) as f:
                    got = json.load(f)
            except FileNotFoundError:
                return MISSING
            except (OSError, ValueError) as e:  # truncated, empty, not UTF-8, unreadable
                raise bad_cell_file(path, f'cannot be read as JSON ({type(e).__name__})') from None
            if not (isinstance(got, dict) and 'value' in got):
                raise bad_cell_file(path, 'is not a cell file ({"key": ..., "value": ...})')
            if json.dumps(got.get('key')) != k:
                raise bad_cell_file(path, f'holds the cell {json.dumps(got.get("key"))}, not {k}')
            self._values[k] = got['value']
        return self._values[k]

    def has(self, key: list) -> bool:
        return self.get(key) is not MISSING

    def put(self, key: list, value) -> None:
        """Write the cell's file atomically: it exists whole or not at all."""
        atomic_write_json({'key': key, 'value': value}, self.cell_path(key))
        self._values[json.dumps(key)] = json.loads(json_text(value))  # what a later read of the file gives

    def json_cell(self, key: list, compute: Callable[[], object]) -> Cell:
        """A cell whose result is compute()'s value, in cells/<digest>.json."""
        return Cell(key, lambda: self.put(key, compute()), lambda: self.has(key))

    def key(self, *parts) -> list:
        s = self.setting
        extra = [] if s == DIGITS else [s.dataset, s.model, list(s.data), list(s.experts), s.eval_epochs,
                                        f'eval seeds: first + {s.eval_seed_stride} x seed']
        return [*parts, self.num_eval, EVAL_PROTOCOL, *extra]

    def eval_seed(self, seed: int, first: int = 10_000) -> int:
        """The seed of the first network scoring distillation seed `seed` (see Setting.eval_seed_stride)."""
        return first + self.setting.eval_seed_stride * seed

    # ------------------------------------------------ experts

    def buffers(self, recipe: str) -> str:
        return self.setting.recipe_path(self.root, recipe)

    def expert_folder(self, recipe: str) -> str:
        return buffer_dir(self.buffers(recipe), self.setting.dataset, self.setting.model, zca=False)

    def experts_ready(self, recipe: str) -> bool:
        """Whether the recipe's experts are all on disk (each .pt and its sidecar)."""
        folder = self.expert_folder(recipe)
        return all(expert_done(folder, i) and read_meta(folder, i) is not None
                   for i in range(self.setting.num_experts))

    def experts_cell(self, recipe: str) -> Cell:
        """buffer.py for the recipe (it skips experts already on disk); its result is the buffers themselves."""
        s = self.setting
        key = ['experts', recipe, s.dataset, s.model, list(s.data), list(s.recipes[recipe]), list(s.experts)]

        def train():
            buffer.main(['--dataset', s.dataset, '--model', s.model, *s.data, *buffer_command(s.recipes[recipe]), *s.experts,
                         '--buffer_path', self.buffers(recipe)])
        return Cell(key, train, lambda: self.experts_ready(recipe))

    def expert_stats(self, recipe: str) -> dict | None:
        """Avg_Var and test accuracy of every expert on disk; None while the recipe's experts are not all there."""
        if not self.experts_ready(recipe):
            return None
        folder = self.expert_folder(recipe)
        metas = [read_meta(folder, i) for i in range(len(expert_files(folder)))]
        return {'avg_var': [m['avg_var'] for m in metas], 'test_acc': [m['test_acc'] for m in metas]}

    def data(self):
        if self._data is None:
            self._data = load_dataset(self.setting.dataset, self.setting.data_path, valid=self.setting.valid)
        return self._data

    # ------------------------------------------------ distillations

    def run_key(self, recipe: str, flags: list[str], ipc: int, seed: int) -> list:
        # Digits' keys hold only the flags on top of BASE, as they always have
        key_flags = flags if self.setting == DIGITS else self.base[ipc] + flags
        return self.key(recipe, key_flags, ipc, seed, self.iterations[ipc])

    def run(self, recipe: str, flags: list[str], ipc: int, seed: int) -> dict:
        """One distillation's cell (the final images' scores, and the in-loop curve), or MISSING."""
        return self.get(self.run_key(recipe, flags, ipc, seed))

    def run_cell(self, recipe: str, flags: list[str], ipc: int, seed: int) -> Cell:
        key = self.run_key(recipe, flags, ipc, seed)
        return self.json_cell(key, lambda: self._one(recipe, self.base[ipc] + flags, ipc, seed, key))

    def runs(self, recipe: str, flags: list[str], ipc: int, seeds: int | None = None) -> list[dict]:
        return [self.run(recipe, flags, ipc, seed) for seed in range(seeds or self.seeds)]

    def score(self, recipe: str, flags: list[str], ipc: int, on: str = 'accs',
              seeds: int | None = None) -> tuple[list[float], int]:
        """(accuracies of every seed's networks, number of runs that diverged); on='val_accs': validation."""
        runs = self.runs(recipe, flags, ipc, seeds)
        return [a for r in runs for a in r.get(on, [])], sum(bool(r.get('diverged')) for r in runs)

    def missing(self, recipe: str, flags: list[str], ipc: int, seeds: int | None = None) -> int:
        """How many of the cell's runs have no result yet."""
        return sum(r is MISSING for r in self.runs(recipe, flags, ipc, seeds))

    def _distill(self, recipe: str, flags: list[str], ipc: int, seed: int) -> str | None:
        """distill.py with the study's flags; its run folder, or None if it diverged."""
        s = self.setting
        if not self.experts_ready(recipe):
            raise RuntimeError(f'the {recipe} experts are not all on disk in {self.expert_folder(recipe)}: '
                               f'run their cell first (--list)')
        buffers = self.buffers(recipe)
        if '--mct' in flags:  # skips files already compressed; atomic, so cells running at once may share it
            compress_buffers.main(['--buffer_path', buffers, '--dataset', s.dataset, '--model', s.model])
        iters = self.iterations[ipc]
        every = max(1, iters // s.curve_points) if s.curve_points else iters
        try:
            return distill.main(['--dataset', s.dataset, '--model', s.model, *s.data, *flags, '--ipc', str(ipc),
                                 '--seed', str(seed), '--Iteration', str(iters), '--eval_it', str(every),
                                 '--num_eval', '1', '--epoch_eval_train', str(s.eval_epochs),
                                 '--buffer_path', buffers, '--run_dir', os.path.join(self.root, 'runs'),
                                 '--wandb', 'disabled'])
        except SystemExit as e:  # distill stops (exit 3) after --max_skips skips in a row: report it, go on
            if e.code != 3:
                raise  # bad input (exit 2): distill printed its one line; the cell is not a divergence
            return None

    def _one(self, recipe: str, flags: list[str], ipc: int, seed: int, key: list) -> dict:
        start = time.time()
        run_dir = self._distill(recipe, flags, ipc, seed)
        seconds = time.time() - start
        if run_dir is None:
            return {'accs': [], 'diverged': True, 'distill_seconds': seconds}
        ckpt = self._save_set(key, run_dir)
        out = self.evaluate(ckpt['images'], ckpt['labels'], float(ckpt['syn_lr']), seed=self.eval_seed(seed))
        return {**out, 'run_dir': run_dir, 'distill_seconds': seconds, 'curve': curve(run_dir, self.setting.model)}

    # ------------------------------------------------ final sets, kept beside the cells

    def set_path(self, key: list) -> str:
        """root/sets/<digest of the run's key>.pt: the run's final set. Small (ipc 10 on 28x28: 0.3 MB), so it
        is kept in git with the cells, unlike the run folder, which a fresh machine does not have."""
        return os.path.join(self.root, 'sets', digest(key) + '.pt')

    def _save_set(self, key: list, run_dir: str) -> dict:
        ckpt = torch.load(run_file(run_dir, CHECKPOINT_FILE), weights_only=True)
        final = {'images': ckpt['images'], 'labels': ckpt['labels'], 'syn_lr': ckpt['syn_lr'],
                 'key': json.dumps(key), 'run_dir': run_dir}
        atomic_torch_save(final, self.set_path(key))
        return final

    def final_set(self, recipe: str, flags: list[str], ipc: int, seed: int) -> dict | None:
        """The run's final {'images', 'labels', 'syn_lr'}; None if it diverged or is not on disk (yet)."""
        run = self.run(recipe, flags, ipc, seed)
        key = self.run_key(recipe, flags, ipc, seed)
        if run is MISSING or run.get('diverged') or not os.path.exists(self.set_path(key)):
            return None
        return load_set(self.set_path(key))

    def set_cell(self, recipe: str, flags: list[str], ipc: int, seed: int) -> Cell:
        """The final set of a finished run that did not keep one (runs computed before sets were kept): from its
        run folder or, where that is gone, distilled again with the same flags and seed. Done once the set is
        on disk; its record (cells/<digest of ['set', *run key]>.json) says how it was recovered and whether
        distilling again reproduced the run's in-loop curve exactly (recovered_sets() reports it)."""
        key = self.run_key(recipe, flags, ipc, seed)

        def recover():
            self.put(['set', *key], self._recover_set(recipe, flags, ipc, seed, key, self.run(recipe, flags, ipc, seed)))
        return Cell(['set', *key], recover, lambda: os.path.exists(self.set_path(key)))

    def _recover_set(self, recipe: str, flags: list[str], ipc: int, seed: int, key: list, run: dict) -> dict:
        old = run.get('run_dir')
        if old and os.path.exists(run_file(old, CHECKPOINT_FILE)):
            self._save_set(key, old)
            return {'from': old, 'distilled_again': False}
        start = time.time()
        run_dir = self._distill(recipe, self.base[ipc] + flags, ipc, seed)
        if run_dir is None:
            raise RuntimeError(f'{key}: the run finished, but distilling it again diverged; its scores belong to '
                               f'images that cannot be recovered (see {self.cell_path(key)})')
        self._save_set(key, run_dir)
        same = curve(run_dir, self.setting.model) == run.get('curve')
        if not same:
            print(f'warning: {run_dir} did not reproduce the in-loop curve of {old}: its final set is not bit for '
                  f'bit the one its cell scored', flush=True)
        return {'from': run_dir, 'distilled_again': True, 'same_curve': same, 'distill_seconds': time.time() - start}

    def recovered_sets(self, keys: list[list]) -> dict[str, int]:
        """Of these runs' sets: how many were distilled again, and how many of those reproduced their curve."""
        got = [self.get(['set', *k]) for k in keys]
        again = [g for g in got if g.get('distilled_again')]
        return {'distilled_again': len(again), 'same_curve': sum(bool(g.get('same_curve')) for g in again)}

    def evaluate(self, images, labels, lr: float, seed: int, models: list[str] | None = None,
                 epochs: int | None = None, num_eval: int | None = None) -> dict:
        """num_eval fresh networks trained on the set (network i seeded seed + i): test (and, with a split,
        validation) accuracies."""
        data = self.data()
        val = (data.images_val, data.labels_val) if data.images_val is not None else None
        results = evaluate_set(models or [self.setting.model], (data.channel, data.num_classes, data.im_size),
                               images, labels, data.images_test, data.labels_test, lr=lr,
                               epochs=epochs or self.setting.eval_epochs, num_eval=num_eval or self.num_eval,
                               seed=seed, val=val)
        if models:
            return {r.model: {'accs': r.accs, 'val_accs': r.val_accs} for r in results}
        return {'accs': results[0].accs, 'val_accs': results[0].val_accs}


def load_set(path: str) -> dict:
    """A final set kept beside the cells (torch.load weights_only); one that does not load is bad_cell_file."""
    try:
        got = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, empty, not a torch file, or a pickle weights_only refuses
        raise bad_cell_file(path, f'cannot be read ({type(e).__name__})') from None
    if not (isinstance(got, dict) and all(torch.is_tensor(got.get(k)) for k in ('images', 'labels', 'syn_lr'))):
        raise bad_cell_file(path, 'is not a final set (images, labels, syn_lr)')
    return got


def remove_study_temps(root: str) -> list[str]:
    """Temp files a killed study left (cells, sets, the former cache.json) under `root`; other cell commands
    may be writing now, so only unlocked and not fresh ones (files.remove_stray_temps, shared)."""
    return [p for folder in (root, os.path.join(root, 'cells'), os.path.join(root, 'sets'))
            for p in remove_stray_temps(folder, shared=True)]


def curve(run_dir: str, model: str) -> list[list]:
    """[[it, test mean, validation mean or None], ...] of the run's in-loop evaluations (1 network each)."""
    with open(run_file(run_dir, METRICS_FILE)) as f:
        rows = [json.loads(line) for line in f]
    return [[r['it'], r[f'eval/{model}_mean'], r.get(f'eval/{model}_val_mean')] for r in rows
            if f'eval/{model}_mean' in r]


def fmt(values: list[float], scale: float = 100.0, digits: int = 2, diverged: int = 0,
        missing: int = 0, runs: int = 0, unit: str = 'seeds') -> str:
    """mean ± std (population) of values; with missing of runs not computed yet, says how many are."""
    note = f' ({diverged} run(s) diverged)' if diverged else ''
    if missing:
        note += f' ({runs - missing} of {runs} {unit} so far)'
    if not values:
        return 'not run yet' if missing == runs and missing else 'diverged' + note
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
    return f'{scale * m:.{digits}f} ± {scale * s:.{digits}f}' + note


# ---------------------------------------------------------------- the one-off conversion of the old cache

def convert_cache(root: str) -> int:
    """root/cache.json (the former single-file cache: json.dumps(key) -> value) into root/cells/, one file per
    entry; each file is read back and compared before cache.json and its .claims/.lock files are removed. A cell
    already on disk must hold the same value. Returns the number of entries."""
    path = os.path.join(root, 'cache.json')
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError) as e:  # truncated, empty, not UTF-8
        raise bad_cell_file(path, f'cannot be read as JSON ({type(e).__name__})') from None
    if not isinstance(cache, dict):
        raise bad_cell_file(path, 'is not the former cache (a JSON object of cells)')
    study = Study(root, 1, 1, {})
    for k, value in cache.items():
        key = json.loads(k)
        if json.dumps(key) != k:  # the digest (and the sets' file names) are of json.dumps(key)
            raise ValueError(f'{path}: key {k} does not round-trip through JSON')
        if study.has(key):
            if json_text(study.get(key)) != json_text(value):
                raise ValueError(f'{study.cell_path(key)} already holds another value for {k}')
        else:
            study.put(key, value)
    fresh = Study(root, 1, 1, {})
    for k, value in cache.items():
        if json_text(fresh.get(json.loads(k))) != json_text(value):
            raise RuntimeError(f'{fresh.cell_path(json.loads(k))} does not read back as cache.json holds it')
    for leftover in (path, path + '.claims', path + '.lock'):
        if os.path.exists(leftover):
            os.remove(leftover)
    return len(cache)
