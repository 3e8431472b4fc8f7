"""Fashion-MNIST studies (ConvNetW32, full-size data): a benchmark with room between random real images
and the full training set, where MTT, AST, ATT and MCT can differ.

    apt-get install dataset-fashion-mnist       # the idx files in /usr/share/datasets/fashion-mnist (the default)
    python -m studies fmnist                    # compute every missing cell, in this process, then the tables
    python -m studies fmnist --list             # the cell commands that can run now, one a line
    python -m studies fmnist --report           # compute nothing: the tables from the cells there (progress)

Cells (studies/cells.py), each one idempotent command `python -m studies fmnist --cell <digest>` writing
results/fmnist/cells/<digest>.json (a distillation also its final set, results/fmnist/sets/<digest>.pt):
  * the experts of each recipe (MTT, AST; committed under results/fmnist/buffers/, so already done);
  * the grid: one MTT distillation (seed 0) per GRID point and ipc;
  * the baselines: random and K-Means-selected real images, per ipc and seed (need the AST experts);
  * every distillation of the methods and ablation tables, per ipc and seed, listed once that ipc's grid is
    complete (their flags are the grid's choice) and their recipe's experts are on disk;
  * the recovery of a shown final set (runs computed before sets were kept), listed once its run exists;
  * each cross-architecture network, listed once its distilled set is on disk.
`--list` prints only the cells whose inputs exist, so a job runner works through the study in a few rounds:

    while python -m studies fmnist --list > todo && [ -s todo ]; do xargs -P 8 -I{} sh -c {} < todo || break; done
    python -m studies fmnist                    # nothing left to compute: writes the tables

(GNU parallel: `parallel < todo`; a SLURM array: `sed -n "${SLURM_ARRAY_TASK_ID}p" todo | sh`.) Running a cell
whose result exists does nothing, so rounds, restarts and duplicates are harmless.

Protocol (every number in results/fmnist/*.md says which part it is):
  * VALID images of the training set are held out (data.py --valid, the same images in every run); the
    experts, the distillation, K-Means and the random baselines never see them.
  * MTT's lr_img, lr_lr, syn_steps and max_start_epoch are chosen once per ipc from GRID on validation
    accuracy (seed 0), then used by every method and ablation row: nothing is chosen on the test set.
  * Every distilled set is scored on its FINAL images by num_eval fresh networks (MTT's evaluation, E =
    EVAL_EPOCHS); cells are mean ± std over (distillation seeds x networks).
"""
import functools
import itertools
import os

import torch

from studies.cells import AST_ALL, AST_STUDENT, MISSING, Setting, Study, compute_missing, fmt
from networks import get_network
from trajmatch.synthetic import final_expert_net, init_synthetic
from trajmatch.trajectory_io import expert_files
from trajmatch.files import atomic_write_bytes, atomic_write_json

# ---------------------------------------------------------------- settings (Fashion-MNIST, CPU)

DEBIAN_PATH = '/usr/share/datasets/fashion-mnist'  # apt-get install dataset-fashion-mnist
VALID = 5000                 # held-out training images, for choosing hyper-parameters
EXPERTS = ['--num_experts', '5', '--train_epochs', '15']  # AST's gradient penalty: ~3.5x an MTT epoch on CPU
MTT, AST = 'MTT', 'AST'
RECIPES = {                  # buffer.py flags of the two expert recipes (docs/method.md, section 1)
    MTT: [],                                                              # SGD lr 0.01, no momentum
    AST: ['--optim', 'sgdmom_code', '--loss_decay', 'code', '--gp', 'code'],  # the AST authors' code
}
EVAL_EPOCHS = 300            # E of the evaluation networks (E+1 epochs, MTT's schedule)
ITERATIONS = {1: 300, 10: 100}   # ipc 10: ~47 runs of ~6 min each on one CPU core at 100 iterations
CURVE_POINTS = 4             # in-loop evaluations per run (1 network, test and validation): the curves
EVAL_SEED_STRIDE = 100       # seed s is scored by networks 10_000 + 100 s + i: no two seeds share a network
FIXED = ['--expert_epochs', '2', '--lr_teacher', '0.01', '--max_experts', '5']  # the first 5 experts, even if more
GRID = {                     # MTT, chosen per ipc on validation accuracy (seed 0)
    'syn_steps': ['10', '20'],
    'max_start_epoch': ['4', '10'],
    'lr_img': ['100', '1000'],
    'lr_lr': ['1e-05'],
}
METHODS = {                  # name -> (expert recipe, distill flags on top of the chosen MTT flags)
    'MTT': (MTT, []),
    'AST': (AST, AST_STUDENT + AST_ALL),
    'ATT': (MTT, ['--auto_steps']),
    'MCT': (MTT, ['--mct']),
}
COMPONENTS = [               # AST's distillation components, in the paper's Table VIII order
    ('K-Means init', ['--pix_init', 'kmeans']),
    ('balanced inner loss', ['--balance_loss']),
    ('intermediate matching', ['--agg_middle_loss']),
    ('weight perturbation', ['--weight_perturb']),
]
CROSS_MODELS = ['ConvNet', 'AlexNet', 'VGG11', 'ResNet18']  # ConvNet = width 128
CROSS_IPC = 10


def setting(data_path: str, experts: list[str] = EXPERTS, eval_epochs: int = EVAL_EPOCHS,
            valid: int = VALID) -> Setting:
    return Setting('FashionMNIST', 'ConvNetW32', data=('--data_path', data_path, '--valid', str(valid)),
                   experts=tuple(experts), recipes=RECIPES, eval_epochs=eval_epochs, valid=valid,
                   data_path=data_path, curve_points=CURVE_POINTS, eval_seed_stride=EVAL_SEED_STRIDE)


# ---------------------------------------------------------------- hyper-parameters on validation

def grid_points(grid: dict) -> list[list[str]]:
    keys = list(grid)
    return [[x for k, v in zip(keys, values) for x in (f'--{k}', v)] for values in itertools.product(*grid.values())]


def choose(study: Study, ipc: int, grid: dict) -> tuple[list[str] | None, str]:
    """MTT's flags with the best mean validation accuracy (seed 0), and the grid's table. While grid points
    have no result yet the choice is None (the table then says so, and names the best so far)."""
    rows = ['| ' + ' | '.join(grid) + ' | validation acc % (seed 0) |', '|' + ' --- |' * (len(grid) + 1)]
    best, best_acc, missing = None, -1.0, 0
    for point in grid_points(grid):
        vals, diverged = study.score(MTT, point, ipc, on='val_accs', seeds=1)
        m = study.missing(MTT, point, ipc, seeds=1)
        missing += m
        acc = sum(vals) / len(vals) if vals else -1.0
        rows.append('| ' + ' | '.join(point[1::2]) + f' | {fmt(vals, diverged=diverged, missing=m, runs=1)} |')
        if acc > best_acc:
            best, best_acc = point, acc
    if missing:
        rows.append(f'\n{missing} grid point(s) not run yet: the choice above is provisional.')
        return None, '\n'.join(rows)
    if best is None:
        raise RuntimeError(f'every grid point diverged at ipc {ipc}; widen fmnist.GRID (smaller lr_img)')
    return best, '\n'.join(rows)


def provisional(study: Study, ipc: int, grid: dict) -> list[str]:
    """The grid's best point so far (the choice once the grid is complete; [] while no point has a result)."""
    best, best_acc = [], -1.0
    for point in grid_points(grid):
        vals, _ = study.score(MTT, point, ipc, on='val_accs', seeds=1)
        acc = sum(vals) / len(vals) if vals else -1.0
        if acc > best_acc:
            best, best_acc = point, acc
    return best


# ---------------------------------------------------------------- baselines

BASELINES = (('random real', 'real'), ('K-Means-selected real (AST init, AST experts)', 'kmeans'))


def baseline_cells(study: Study, ipcs: list[int]):
    """Random real images and AST's K-Means selection alone (on the AST experts' features), per ipc and seed."""
    @functools.cache
    def expert():  # only when a baseline is computed
        data = study.data()
        net = get_network(study.setting.model, data.channel, data.num_classes, data.im_size)
        return final_expert_net(expert_files(study.expert_folder(AST)), False, net)
    for _, pick in BASELINES:
        for ipc in ipcs:
            for seed in range(study.seeds):
                def compute(pick=pick, ipc=ipc, seed=seed):
                    images, labels = init_synthetic(study.data(), ipc, pick, torch.Generator().manual_seed(seed),
                                                    expert_net=expert(), seed=seed)
                    return study.evaluate(images, labels, 0.01, seed=study.eval_seed(seed))
                yield study.json_cell(study.key('baseline', pick, ipc, seed), compute)


def baselines(study: Study, ipcs: list[int]) -> str:
    """Random real images, AST's K-Means selection alone (on the AST experts' features), the full set."""
    rows = ['| baseline | ' + ' | '.join(f'ipc {i} acc %' for i in ipcs) + ' |', '| --- |' + ' --- |' * len(ipcs)]
    for name, pick in BASELINES:
        cells = []
        for ipc in ipcs:
            accs, missing = [], 0
            for seed in range(study.seeds):
                got = study.get(study.key('baseline', pick, ipc, seed))
                accs += got.get('accs', [])
                missing += got is MISSING
            cells.append(fmt(accs, missing=missing, runs=study.seeds))
        rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    stats = study.expert_stats(MTT)
    full = fmt(stats['test_acc']) if stats else 'not run yet'
    rows.append(f'| full training set ({len(study.data().labels_train):,} images): the MTT experts after '
                f'{study.setting.experts[-1]} epochs | ' + ' | '.join(full for _ in ipcs) + ' |')
    return '\n'.join(rows) + '\n\nReal baselines train with lr 0.01 (the learned lr of a distilled set is its own).'


# ---------------------------------------------------------------- tables

def cell_text(study: Study, recipe: str, flags: list[str], ipc: int) -> str:
    """Test accuracy of the final images, mean ± std over seeds x networks (and how many runs diverged)."""
    accs, diverged = study.score(recipe, flags, ipc)
    return fmt(accs, diverged=diverged, missing=study.missing(recipe, flags, ipc), runs=study.seeds)


def smoothness(study: Study) -> str:
    rows = ['| expert recipe | Avg_Var (mean ± std over experts) | expert test acc % |', '| --- | --- | --- |']
    for recipe, flags in RECIPES.items():
        stats = study.expert_stats(recipe)
        var, acc = (fmt(stats['avg_var'], 1, 5), fmt(stats['test_acc'])) if stats else ('not run yet',) * 2
        rows.append(f"| {recipe} (`{' '.join(flags) or 'buffer.py defaults'}`) | {var} | {acc} |")
    return '\n'.join(rows)


def methods(study: Study, ipcs: list[int], chosen: dict[int, list[str]]) -> str:
    rows = ['| method | ' + ' | '.join(f'ipc {i} test acc % ({study.iterations[i]} it)' for i in ipcs) + ' |',
            '| --- |' + ' --- |' * len(ipcs)]
    for name, (recipe, flags) in METHODS.items():
        rows.append(f'| {name} | ' + ' | '.join(cell_text(study, recipe, chosen[i] + flags, i) for i in ipcs) + ' |')
    return '\n'.join(rows)


def ablation_rows() -> dict[str, list[tuple[str, str, list[str]]]]:
    """{section: [(row name, expert recipe, distill flags)]}: cumulative (the paper's Table VIII) and
    leave-one-out from full AST; the student is AST's (momentum 0.9, code perturbation) in every AST row."""
    cumulative = [('MTT (plain experts, MTT student), reference', MTT, []),
                  ('smooth experts', AST, AST_STUDENT)]
    flags = []
    for name, extra in COMPONENTS:
        flags = flags + extra
        cumulative.append((f'+ {name}', AST, AST_STUDENT + flags))
    leave_one_out = [('full AST', AST, AST_STUDENT + AST_ALL), ('- smooth experts (MTT experts)', MTT, AST_STUDENT + AST_ALL)]
    for name, _ in COMPONENTS:
        leave_one_out.append((f'- {name}', AST,
                              AST_STUDENT + [f for other, extra in COMPONENTS if other != name for f in extra]))
    return {'cumulative (AST student)': cumulative, 'leave one out of full AST': leave_one_out}


def ablation(study: Study, ipcs: list[int], chosen: dict[int, list[str]]) -> str:
    head = '| {} | ' + ' | '.join(f'ipc {i} test acc %' for i in ipcs) + ' |'
    sep = '| --- |' + ' --- |' * len(ipcs)
    rows = []
    for section, section_rows in ablation_rows().items():
        rows += ([''] if rows else []) + [head.format(section), sep]
        rows += [f'| {name} | ' + ' | '.join(cell_text(study, recipe, chosen[i] + flags, i) for i in ipcs) + ' |'
                 for name, recipe, flags in section_rows]
    return '\n'.join(rows)


def distillations(ipcs: list[int], seeds: int) -> list[tuple[str, list[str], int, int]]:
    """Every (recipe, flags, ipc, seed) distillation the methods and ablation tables score, once each (flags on
    top of the grid's choice)."""
    rows = [(recipe, flags) for recipe, flags in METHODS.values()]
    rows += [(recipe, flags) for section in ablation_rows().values() for _, recipe, flags in section]
    unique = list({(recipe, tuple(flags)): None for recipe, flags in rows})
    return [(recipe, list(flags), ipc, seed) for ipc in ipcs for recipe, flags in unique for seed in range(seeds)]


def shown_sets(ipcs: list[int], cross_ipc: int, seeds: int) -> list[tuple[str, list[str], int, int]]:
    """The runs whose final images the study needs besides their scores: MTT's and AST's seed 0 at every ipc
    (the image grids) and every seed at the cross-architecture ipc."""
    return [(*METHODS[name], ipc, seed) for ipc in ipcs for name in ('MTT', 'AST')
            for seed in range(seeds if ipc == cross_ipc else 1)]


def cross_networks(study: Study, ipc: int, chosen: list[str], models: list[str],
                   epochs: int) -> list[tuple[str, str, str, list[str], int, int, list]]:
    """[(set, model, recipe, flags, seed, network, key)]: one entry per scoring network of each MTT and AST run
    that did not diverge (network i of seed s seeded 20_000 + 100 s + i), the cheap models first; a run with no
    result yet has none."""
    nets = []
    for m in models:
        for name in ('MTT', 'AST'):
            recipe, flags = METHODS[name]
            flags = chosen + flags
            for seed, run in enumerate(study.runs(recipe, flags, ipc)):
                if run is MISSING or run.get('diverged'):
                    continue
                for i in range(study.num_eval):
                    nets.append((name, m, recipe, flags, seed, i,
                                 study.key('cross', name, ipc, seed, m, epochs, 'network', i)))
    return nets


def cross_cells(study: Study, ipc: int, chosen: list[str], models: list[str], epochs: int):
    """A cell per cross-architecture network whose distilled set is on disk."""
    for _, m, recipe, flags, seed, i, key in cross_networks(study, ipc, chosen, models, epochs):
        if not os.path.exists(study.set_path(study.run_key(recipe, flags, ipc, seed))):
            continue  # its set cell comes first

        def compute(recipe=recipe, flags=flags, seed=seed, m=m, i=i):
            final = study.final_set(recipe, flags, ipc, seed)
            return study.evaluate(final['images'], final['labels'], float(final['syn_lr']), models=[m],
                                  seed=study.eval_seed(seed, 20_000) + i, epochs=epochs, num_eval=1)[m]
        yield study.json_cell(key, compute)


def cross_architecture(study: Study, ipc: int, chosen: list[str], models: list[str], epochs: int) -> str:
    """The MTT and AST sets scored on other networks; one cell per network."""
    nets = cross_networks(study, ipc, chosen, models, epochs)
    rows = ['| set (ipc %d) | ' % ipc + ' | '.join(models) + ' |', '| --- |' + ' --- |' * len(models)]
    for name in ('MTT', 'AST'):
        recipe, flags = METHODS[name]
        runs = study.runs(recipe, chosen + flags, ipc)
        diverged = sum(bool(r.get('diverged')) for r in runs)
        networks = (study.seeds - diverged) * study.num_eval
        cells = []
        for m in models:
            got = [study.get(key) for set_, model, *_, key in nets if (set_, model) == (name, m)]
            accs = [a for g in got for a in g.get('accs', [])]
            missing = networks - len(accs)
            cells.append(fmt(accs, diverged=diverged, missing=missing, runs=networks, unit='networks'))
        rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    keys = [study.run_key(recipe, chosen + flags, ipc, seed) for recipe, flags in (METHODS['MTT'], METHODS['AST'])
            for seed in range(study.seeds)]
    again = study.recovered_sets(keys)
    note = (f" {again['distilled_again']} of these sets were distilled again (same flags and seed; their run folders "
            f"were gone), and {again['same_curve']} of those reproduced the cached run's in-loop curve exactly."
            if again['distilled_again'] else '')
    return '\n'.join(rows) + f"\n\nEach network trains {epochs + 1} epochs (MTT's schedule) with the set's learned lr.{note}"


# ---------------------------------------------------------------- pictures

def plot_curves(study: Study, ipcs: list[int], chosen: dict[int, list[str]], path: str) -> None:
    """Accuracy of one in-loop network against the iteration, mean over seeds: test solid, validation dashed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ipcs), figsize=(5.5 * len(ipcs), 4), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        for (name, (recipe, flags)), color in zip(METHODS.items(), ('C0', 'C1', 'C2', 'C3')):
            curves = [r['curve'] for r in study.runs(recipe, chosen[ipc] + flags, ipc) if r.get('curve')]
            if not curves:
                continue
            its = [p[0] for p in curves[0]]
            for col, style, what in ((1, '-', 'test'), (2, '--', 'validation')):
                ys = [sum(c[k][col] for c in curves) / len(curves) for k in range(len(its))
                      if all(c[k][col] is not None for c in curves)]
                if len(ys) == len(its):
                    ax.plot(its, [100 * y for y in ys], style, color=color, label=f'{name} {what}')
        ax.set(title=f'Fashion-MNIST, ipc {ipc}', xlabel='iteration', ylabel='accuracy % (1 network)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_images(study: Study, ipc: int, chosen: list[str], path: str) -> None:
    """The final synthetic images of MTT and AST (seed 0) side by side, one row per class."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    data = study.data()
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.9 * ipc * 2, 1 + 0.9 * data.num_classes), squeeze=False)
    drawn = 0
    for ax, name in zip(axes[0], ('MTT', 'AST')):
        recipe, flags = METHODS[name]
        run = study.run(recipe, chosen + flags, ipc, 0)
        final = study.final_set(recipe, chosen + flags, ipc, 0)
        ax.axis('off')
        if final is None:
            ax.set_title(f"{name}: {'diverged' if run.get('diverged') else 'not run yet' if run is MISSING else 'images not at hand'}")
            continue
        grid = make_grid(data.to_pixels(final['images']), nrow=ipc, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap='gray', vmin=0, vmax=1)
        ax.set_title(f'{name}, ipc {ipc}')
        drawn += 1
    if not drawn:  # nothing to show (--report, sets not there yet): leave the picture that is there
        plt.close(fig)
        return
    step = data.im_size[0] + 1
    axes[0][0].axis('on')
    axes[0][0].set_xticks([])
    axes[0][0].set_yticks([1 + step * c + step // 2 for c in range(data.num_classes)], data.class_names, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the whole study

class FashionStudy:
    """The study's settings, its cells (cells()) and its tables (tables())."""

    def __init__(self, root: str, data_path: str, *, seeds: int = 3, num_eval: int = 5,
                 ipcs: tuple[int, ...] = (1, 10), iterations: dict[int, int] = ITERATIONS,
                 experts: list[str] = EXPERTS, eval_epochs: int = EVAL_EPOCHS, valid: int = VALID,
                 grid: dict = GRID, cross_models: list[str] = CROSS_MODELS, cross_epochs: int = EVAL_EPOCHS,
                 cross_ipc: int = CROSS_IPC):
        self.root, self.ipcs, self.grid = root, list(ipcs), grid
        self.cross_models, self.cross_epochs, self.cross_ipc = cross_models, cross_epochs, cross_ipc
        self.experts, self.eval_epochs, self.valid = experts, eval_epochs, valid
        self.study = Study(root, seeds, num_eval, {i: iterations[i] for i in ipcs},
                           setting=setting(data_path, experts, eval_epochs, valid), base={i: list(FIXED) for i in ipcs})

    def cells(self):
        """Every cell whose inputs exist, done or not, in the order a single process computes them. Lazy: what
        a cell needs is looked at only once the cells before it have been handled."""
        study = self.study
        for recipe in RECIPES:
            yield study.experts_cell(recipe)
        if study.experts_ready(MTT):
            for ipc in self.ipcs:
                for point in grid_points(self.grid):
                    yield study.run_cell(MTT, point, ipc, 0)
        if study.experts_ready(AST):
            yield from baseline_cells(study, self.ipcs)
        chosen = {}
        for ipc in self.ipcs:
            chosen[ipc] = choose(study, ipc, self.grid)[0]
            if chosen[ipc] is None:
                continue  # the grid is not complete: the distillations' flags are not known yet
            for recipe, flags, _, seed in distillations([ipc], study.seeds):
                if study.experts_ready(recipe):
                    yield study.run_cell(recipe, chosen[ipc] + flags, ipc, seed)
        for recipe, flags, ipc, seed in shown_sets(self.ipcs, self.cross_ipc, study.seeds):
            if chosen[ipc] is None:
                continue
            run = study.run(recipe, chosen[ipc] + flags, ipc, seed)
            if run is not MISSING and not run.get('diverged'):
                yield study.set_cell(recipe, chosen[ipc] + flags, ipc, seed)
        if self.cross_ipc in self.ipcs and chosen[self.cross_ipc] is not None:
            yield from cross_cells(study, self.cross_ipc, chosen[self.cross_ipc], self.cross_models, self.cross_epochs)

    def tables(self, report: bool = False) -> dict[str, str]:
        """Every table (written to root/<name>.md) and picture, from the cells there; returns {name: markdown}.
        report: a progress report (cells short of runs say how many they have; an unfinished grid's choice is
        provisional), says so in its header."""
        study, ipcs, root = self.study, self.ipcs, self.root
        header = (f"Fashion-MNIST, ConvNetW32, {self.valid:,} training images held out for validation; experts "
                  f"{' '.join(self.experts)} per recipe; final images scored by {study.num_eval} networks (MTT's "
                  f"evaluation, E = {self.eval_epochs}); mean ± std over {study.seeds} distillation seeds x "
                  f"{study.num_eval} networks."
                  + (" **A progress report** (`--report`): cells show the runs done so far." if report else ''))
        tables = {'smoothness': smoothness(study)}
        chosen, grids = {}, []
        for ipc in ipcs:
            chosen[ipc], table = choose(study, ipc, self.grid)
            if chosen[ipc] is None:
                chosen[ipc] = provisional(study, ipc, self.grid)
            grids.append(f'ipc {ipc} ({study.iterations[ipc]} iterations, fixed: `{" ".join(FIXED)}`); chosen: '
                         f'`{" ".join(chosen[ipc])}`\n\n{table}')
        tables['selection'] = '\n\n'.join(grids)
        tables['baselines'] = baselines(study, ipcs)
        tables['methods'] = methods(study, ipcs, chosen)
        tables['ablation'] = ablation(study, ipcs, chosen)
        if self.cross_ipc in ipcs:
            tables['cross_architecture'] = cross_architecture(study, self.cross_ipc, chosen[self.cross_ipc],
                                                              self.cross_models, self.cross_epochs)
        plot_curves(study, ipcs, chosen, os.path.join(root, 'curves.png'))
        for ipc in ipcs:
            plot_images(study, ipc, chosen[ipc], os.path.join(root, f'images_ipc{ipc}.png'))
        for name, table in tables.items():
            text = f'<!-- written by: python -m studies fmnist -->\n{header}\n\n{table}\n'
            atomic_write_bytes(text.encode(), os.path.join(root, f'{name}.md'))
        atomic_write_json({str(i): chosen[i] for i in ipcs}, os.path.join(root, 'chosen.json'))
        return tables


def run(root: str, data_path: str, *, report: bool = False, **settings) -> dict[str, str]:
    """Compute every missing cell in this process (none with report), then write the tables; {name: markdown}."""
    os.makedirs(root, exist_ok=True)
    fashion = FashionStudy(root, data_path, **settings)
    if not report:
        compute_missing(fashion.cells)
    return fashion.tables(report=report)


# A seconds-long pass over every table and picture (CI, on a small idx fixture): tiny experts, few steps.
SMOKE = dict(seeds=1, num_eval=1, ipcs=(1, 2), iterations={1: 2, 2: 2}, eval_epochs=1, valid=20,
             experts=['--num_experts', '2', '--train_epochs', '4'],
             grid={'syn_steps': ['2'], 'max_start_epoch': ['1', '2'], 'lr_img': ['100'], 'lr_lr': ['1e-05']},
             cross_models=['ConvNetW32', 'AlexNet'], cross_epochs=1, cross_ipc=2)
