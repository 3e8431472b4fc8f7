"""Every preset, in one place: the MTT and AST rows the papers ran, plus the Digits quickstart.

    python presets.py list                  # names
    python presets.py distill cifar10_ipc10 # the flags distill.sh passes
    python presets.py buffer cifar10_ipc10  # the flags buffer.sh passes (experts that row needs)
    python presets.py run distill cifar10_ipc10 --wandb offline   # what distill.sh does
    python presets.py table                 # the preset table, with each row's source
    python presets.py markdown > docs/presets.md   # the generated docs page (tests/test_presets.py checks it)
    python presets.py plan                  # every preset's predicted memory (docs/memory.md's table)
A preset's buffer flags are derived from its distill row (same dataset/subset/res/model/zca),
so `bash buffer.sh X && bash distill.sh X` always finds its experts. MTT experts train at lr
0.01 (a row's lr_teacher is the initial student lr); AST experts use the authors' recipe.
Every row names its source in SOURCES; where the paper and the authors' code disagree, the row
follows the code that produced the published numbers (docs/method.md).
"""
import sys

# ---------------------------------------------------------------- experts

MTT_EXPERTS = {'num_experts': 100, 'train_epochs': 50}                # MTT paper: 100 experts x 50 epochs
DIGITS_EXPERTS = {'num_experts': 10, 'train_epochs': 20}             # CPU quickstart: ~1 min
# AST README: `buffer.py --optim SGDMOM --loss_decay --gp True --train_epochs=50 --num_experts=100`, "with
# the default learning rate": the authors' buffer.py defaults (sgdmom_code: momentum 0.9, wd 1e-3, lr 0.003,
# x0.6 after epoch E//2+1) and their own loss decay and gradient penalty ('code' variants).
AST_EXPERTS = {'optim': 'sgdmom_code', 'loss_decay': 'code', 'gp': 'code'}  # folder: the row's buffer_path

# ---------------------------------------------------------------- distillation rows

def _mtt(dataset, ipc, syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr, lr_teacher, batch_syn, zca, **extra):
    row = {'dataset': dataset, 'ipc': ipc, 'syn_steps': syn_steps, 'expert_epochs': expert_epochs,
           'max_start_epoch': max_start_epoch, 'lr_img': lr_img, 'lr_lr': lr_lr, 'lr_teacher': lr_teacher,
           'Iteration': 5000, 'eval_it': 500, **extra}
    if batch_syn is not None:  # None = the whole synthetic set
        row['batch_syn'] = batch_syn
    if zca:
        row['zca'] = True
    return row


MTT_TABLE = ("MTT's hyper-parameter table (MTT paper v2 appendix; posted by the authors in "
             "GeorgeCazenavette/mtt-distillation issue #7)")
MTT_IMAGENET = ("GeorgeCazenavette/mtt-distillation issue #1, the authors' answer: `--syn_steps=20 --expert_epochs=2 "
                "--max_start_epoch=10 --lr_img=100000 --lr_lr=1e-06 --lr_teacher=0.01`, and `--batch_syn=20` at ipc 10")
DISTILL = {
    # Digits quickstart (CPU, a few minutes). lr_img 30: at 100, seed 1 diverged (syn_lr < 0, NaN)
    'digits_ipc1': {'dataset': 'Digits', 'ipc': 1, 'syn_steps': 20, 'expert_epochs': 2, 'max_start_epoch': 10,
                    'lr_img': 30, 'lr_lr': 1e-5, 'lr_teacher': 0.01, 'Iteration': 200, 'eval_it': 100,
                    'num_eval': 3},
    'digits_ipc10': {'dataset': 'Digits', 'ipc': 10, 'syn_steps': 20, 'expert_epochs': 2, 'max_start_epoch': 10,
                     'lr_img': 30, 'lr_lr': 1e-5, 'lr_teacher': 0.01, 'Iteration': 300, 'eval_it': 100,
                     'num_eval': 3},
    'cifar10_ipc1': _mtt('CIFAR10', 1, 50, 2, 2, 100, 1e-7, 0.01, None, True),
    'cifar10_ipc10': _mtt('CIFAR10', 10, 30, 2, 20, 100, 1e-5, 0.001, None, True),
    'cifar10_ipc50': _mtt('CIFAR10', 50, 30, 2, 40, 1000, 1e-5, 0.001, None, False),
    'cifar100_ipc1': _mtt('CIFAR100', 1, 20, 3, 20, 1000, 1e-5, 0.01, None, True),
    'cifar100_ipc10': _mtt('CIFAR100', 10, 20, 2, 20, 1000, 1e-5, 0.01, None, False),
    'cifar100_ipc50': _mtt('CIFAR100', 50, 80, 2, 40, 1000, 1e-5, 0.01, 125, True),
    'tiny_ipc1': _mtt('Tiny', 1, 10, 2, 10, 1e4, 1e-4, 0.01, None, False),
    'tiny_ipc10': _mtt('Tiny', 10, 20, 2, 40, 1e4, 1e-4, 0.01, 200, False),
    'tiny_ipc50': _mtt('Tiny', 50, 20, 2, 40, 1e4, 1e-4, 0.01, 300, False),
}
SOURCES = {
    'digits_ipc1': 'ours (CPU quickstart; lr_img 30 chosen on Digits: 100 diverged at seed 1)',
    'digits_ipc10': 'ours (CPU quickstart)',
    **{name: MTT_TABLE for name in DISTILL if name.startswith(('cifar', 'tiny'))},
}
for _subset in ('imagenette', 'imagewoof', 'imagefruit', 'imagemeow', 'imagesquawk', 'imageyellow'):
    DISTILL[f'{_subset}_ipc1'] = _mtt('ImageNet', 1, 20, 2, 10, 1e5, 1e-6, 0.01, None, False, subset=_subset, res=128)
    DISTILL[f'{_subset}_ipc10'] = _mtt('ImageNet', 10, 20, 2, 10, 1e5, 1e-6, 0.01, 20, False, subset=_subset, res=128)
    SOURCES[f'{_subset}_ipc1'] = SOURCES[f'{_subset}_ipc10'] = MTT_IMAGENET

# AST rows: the authors' commands, flag for flag. Their distill.py's student momentum (--mom) defaults to 0.9,
# their weight perturbation is the 'code' variant, their intermediate terms sit at student step (N // M) * i
# ('code', distill.py:493), their K-Means clusters the expert's logits (distill.py:155; --pix_init avg), and
# their evaluation is ours with --lr_decay ast. Line numbers: their distill.sh at HEAD (8030869).
AST_AUTHORS = {'syn_mom': 0.9, 'perturb_variant': 'code', 'middle_steps': 'code', 'lr_decay': 'ast',
               'buffer_path': 'buffers/ast'}
AST_KMEANS = {'pix_init': 'avg', 'kmeans_features': 'logits'}  # their `--pix_init avg`
# Their experts: README's command (AST_EXPERTS). Their distill.sh lines read folders (buffer_flat1, buffer_flat2,
# buffer_cifa10_flat, buffer) that no script of their repository makes; every AST row here uses the one recipe
# they document, the README's ("We used 50 epochs with the default learning rate for all of our experts").
AST_EXPERT_NOTE = ("; experts: the README's buffer.py command (their distill.sh reads the folder `{folder}`, "
                   "which no script in their repository makes)")
DISTILL['cifar100_ipc1_ast'] = {
    **_mtt('CIFAR100', 1, 20, 3, 20, 1000, 1e-5, 0.01, None, True), **AST_AUTHORS, **AST_KMEANS,
    'weight_perturb': True, 'agg_middle_loss': True, 'balance_loss': True}
SOURCES['cifar100_ipc1_ast'] = ("AST README's distill command: `--ipc=1 --pix_init avg --weight_perturb "
                                "--agg_middle_loss --balance_loss --syn_steps=20 --expert_epochs=3 --max_start_epoch=20 "
                                "--zca --lr_img=1000 --lr_lr=1e-05 --lr_teacher=0.01`; experts: the README's "
                                "buffer.py command")
DISTILL['cifar100_ipc10_ast'] = {
    **_mtt('CIFAR100', 10, 20, 2, 30, 1000, 1e-5, 0.01, 128, False), **AST_AUTHORS, **AST_KMEANS,
    'weight_perturb': True, 'agg_middle_loss': True, 'epoch_eval_train': 300}
SOURCES['cifar100_ipc10_ast'] = ("the authors' distill.sh:14, its active CIFAR-100 ipc-10 line: `--epoch_eval_train "
                                 "300 --pix_init avg --weight_perturb --agg_middle_loss --lr_img=1000 --lr_teacher 0.01 "
                                 "--lr_lr=1e-05 --batch_syn 128 --syn_steps=20 --expert_epochs=2 --max_start_epoch=30` "
                                 "(no --zca, no --balance_loss)" + AST_EXPERT_NOTE.format(folder='buffer_flat2'))
DISTILL['cifar100_ipc50_ast'] = {
    **_mtt('CIFAR100', 50, 80, 2, 40, 1000, 1e-5, 0.01, 700, False), **AST_AUTHORS, **AST_KMEANS}
SOURCES['cifar100_ipc50_ast'] = ("the authors' distill.sh:21, its CIFAR-100 ipc-50 line: `--pix_init avg "
                                 "--lr_img=1000 --lr_teacher 0.01 --lr_lr=1e-05 --batch_syn 700 --syn_steps=80 "
                                 "--expert_epochs=2 --max_start_epoch=40` (no --zca, --weight_perturb, "
                                 "--agg_middle_loss or --balance_loss)" + AST_EXPERT_NOTE.format(folder='buffer_flat1'))
DISTILL['cifar10_ipc10_ast'] = {
    **_mtt('CIFAR10', 10, 30, 2, 20, 100, 1e-6, 0.01, None, True), **AST_AUTHORS,
    'weight_perturb': True, 'agg_middle_loss': True, 'balance_loss': True}
SOURCES['cifar10_ipc10_ast'] = ("the authors' distill.sh:16, its CIFAR-10 ipc-10 line on smooth experts "
                                "(buffer_cifa10_flat): `--weight_perturb --zca --balance_loss --agg_middle_loss "
                                "--lr_img=100 --lr_teacher 0.01 --lr_lr=1e-06 --syn_steps=30 --expert_epochs=2 "
                                "--max_start_epoch=20` (real-image init: no --pix_init avg)"
                                + AST_EXPERT_NOTE.format(folder='buffer_cifa10_flat'))
DISTILL['tiny_ipc1_ast'] = {
    **_mtt('Tiny', 1, 10, 2, 10, 1e4, 1e-4, 0.01, None, False), 'model': 'ConvNetD4', **AST_AUTHORS,
    'weight_perturb': True, 'agg_middle_loss': True}
SOURCES['tiny_ipc1_ast'] = ("the authors' distill.sh:24, its Tiny ImageNet ipc-1 line: `--weight_perturb "
                            "--agg_middle_loss --lr_img=10000 --lr_teacher 0.01 --lr_lr=1e-04 --model ConvNetD4 "
                            "--syn_steps=10 --expert_epochs=2 --max_start_epoch=10` (real-image init, no --zca)"
                            + AST_EXPERT_NOTE.format(folder='buffer'))
DISTILL['digits_ipc1_ast'] = {**DISTILL['digits_ipc1'], **AST_AUTHORS, **AST_KMEANS, 'lr_lr': 1e-6,
                              'weight_perturb': True, 'agg_middle_loss': True, 'balance_loss': True}
SOURCES['digits_ipc1_ast'] = ('ours: digits_ipc1 with every AST component as in cifar100_ipc1_ast; lr_lr 1e-6 '
                              '(1e-5 diverged on AST experts, docs/studies.md)')
EXPERT_RECIPE = {name: AST_EXPERTS for name in DISTILL if name.endswith('_ast')}

# ---------------------------------------------------------------- what a GPU user compares with

# preset -> published test accuracy (%, ConvNet), mean ± std. MTT rows: the MTT paper (Table 1: CIFAR and Tiny;
# Table 2: ImageNet subsets). AST rows: AST Table III. AST's Tables III and V reprint MTT's rows; see MTT_REPRINT.
PUBLISHED = {
    'cifar10_ipc1': '46.3 ± 0.8', 'cifar10_ipc10': '65.3 ± 0.7', 'cifar10_ipc50': '71.6 ± 0.2',
    'cifar100_ipc1': '24.3 ± 0.3', 'cifar100_ipc10': '40.1 ± 0.4', 'cifar100_ipc50': '47.7 ± 0.2',
    'tiny_ipc1': '8.8 ± 0.3', 'tiny_ipc10': '23.2 ± 0.2', 'tiny_ipc50': '28.0 ± 0.3',
    'imagenette_ipc1': '47.7 ± 0.9', 'imagenette_ipc10': '63.0 ± 1.3',
    'imagewoof_ipc1': '28.6 ± 0.8', 'imagewoof_ipc10': '35.8 ± 1.8',
    'imagefruit_ipc1': '26.6 ± 0.8', 'imagefruit_ipc10': '40.3 ± 1.3',
    'imagemeow_ipc1': '30.7 ± 1.6', 'imagemeow_ipc10': '40.4 ± 2.2',
    'imagesquawk_ipc1': '39.4 ± 1.5', 'imagesquawk_ipc10': '52.3 ± 1.0',
    'imageyellow_ipc1': '45.2 ± 0.8', 'imageyellow_ipc10': '60.0 ± 1.5',
    'cifar100_ipc1_ast': '26.6 ± 0.4', 'cifar100_ipc10_ast': '44.4 ± 0.6', 'cifar100_ipc50_ast': '51.7 ± 0.7',
    'cifar10_ipc10_ast': '67.1 ± 0.4', 'tiny_ipc1_ast': '13.7 ± 1.4',
}
MTT_REPRINT = ("AST's Tables III and V reprint MTT's numbers; they agree with the rows above except CIFAR-10 ipc 1 "
               "(46.2 there), ipc 10 (65.4) and CIFAR-100 ipc 10 (39.7). Tiny ImageNet ipc 50, ImageSquawk and "
               "ImageYellow are not reprinted there.")
# paper -> (where its number is from, the statistic behind it, the logged key of ours that is that statistic)
STATISTICS = {
    'MTT': ('MTT paper', 'the best in-loop evaluation (mean over its networks of the final-epoch test accuracy), '
            'selected on the test set', '`eval/best_mean_selected_on_test` (metrics.jsonl; final.json '
            '`best_mean_selected_on_test`); `eval.py --run R --which best` scores that set again'),
    'AST': ('AST Table III', 'the maximum test accuracy over checks every 20 epochs of each evaluation network, '
            'and the maximum over in-loop evaluations (their `--num_eval 1`): selected on the test set twice',
            'the maximum over iterations of `eval/<model>_max_selected_on_test` (metrics.jsonl, logged with '
            '`--lr_decay ast`: per evaluation, the mean over networks of each one\'s maximum over checks)'),
}
HEADLINE = ('`eval/<model>_mean` at the last iteration (final.json `final_mean`), and `eval.py --run R` (the final '
            'set, `images_final.pt`, on fresh networks): the final-epoch test accuracy of the final set, '
            'selected on nothing')


def paper_of(name: str) -> str:
    return 'AST' if name.endswith('_ast') else 'MTT'


DEFAULT = 'digits_ipc1'  # what buffer.sh / distill.sh run with no preset
BUFFER_KEYS = ('dataset', 'subset', 'res', 'model', 'zca', 'buffer_path')


# ---------------------------------------------------------------- flags

def to_flags(row: dict) -> list[str]:
    flags = []
    for key, value in row.items():
        if value is True:
            flags.append(f'--{key}')
        elif isinstance(value, list):
            flags += [f'--{key}', *map(str, value)]
        else:
            flags += [f'--{key}', str(value)]
    return flags


def distill_flags(name: str) -> list[str]:
    return to_flags(DISTILL[name])


def expert_row(name: str) -> dict:
    """How many experts a preset trains, and their recipe (buffer.py flags beyond the data ones)."""
    experts = DIGITS_EXPERTS if DISTILL[name]['dataset'] == 'Digits' else MTT_EXPERTS
    return {**experts, **EXPERT_RECIPE.get(name, {})}


def buffer_flags(name: str) -> list[str]:
    row = DISTILL[name]
    return to_flags({**{k: row[k] for k in BUFFER_KEYS if k in row}, **expert_row(name)})


def run(script: str, argv: list[str]) -> None:
    """buffer.sh / distill.sh: `run SCRIPT [PRESET] [extra flags]`; echo the command, then become it."""
    import os
    name = argv[0] if argv and not argv[0].startswith('-') else DEFAULT
    extra = argv[1:] if argv and not argv[0].startswith('-') else argv
    if name not in DISTILL:
        print(f"error: unknown preset '{name}'; choose one of: {', '.join(DISTILL)}", file=sys.stderr)
        sys.exit(2)
    flags = (buffer_flags if script == 'buffer' else distill_flags)(name)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{script}.py'), *flags, *extra]
    print('+ python ' + ' '.join(cmd[1:]), file=sys.stderr, flush=True)
    os.execv(sys.executable, cmd)


def markdown_table() -> str:
    """The README's preset table: the matching hyper-parameters, the experts, and each row's source."""
    cols = ('ipc', 'syn_steps', 'expert_epochs', 'max_start_epoch', 'lr_img', 'lr_lr', 'lr_teacher')
    lines = ['| preset | dataset | ' + ' | '.join(cols) + ' | batch_syn | zca | experts | source |',
             '| --- ' * (len(cols) + 7) + '|']
    for name, row in DISTILL.items():
        data = row['dataset'] + (f" {row['subset']} {row['res']}px" if row['dataset'] == 'ImageNet' else '')
        experts = 'AST (sgdmom_code, loss decay, gp)' if name in EXPERT_RECIPE else 'MTT (SGD)'
        cells = [f'{row[c]:g}' if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append(f'| `{name}` | {data} | ' + ' | '.join(cells) + f" | {row.get('batch_syn', 'all')} | "
                     f"{'yes' if row.get('zca') else 'no'} | {experts} | {SOURCES[name]} |")
    return '\n'.join(lines)


DOC_COLUMNS = ('ipc', 'syn_steps', 'expert_epochs', 'max_start_epoch', 'lr_img', 'lr_lr', 'lr_teacher')
_SHOWN = {'dataset', 'subset', 'res', 'model', 'batch_syn', 'zca', 'Iteration', 'eval_it', *DOC_COLUMNS}


def _cell(value) -> str:
    return f'{value:g}' if isinstance(value, float) else str(value)


def _experts_label(name: str) -> str:
    row = expert_row(name)
    recipe = 'AST code recipe' if name in EXPERT_RECIPE else 'MTT (SGD)'
    return f"{recipe}, {row['num_experts']} x {row['train_epochs']}"


def markdown_doc() -> str:
    """docs/presets.md: every preset with all its flags, its experts, and its source; a source that several
    rows share is written once, as a numbered note. `python presets.py markdown > docs/presets.md`."""
    from trajmatch.data import DEFAULT_MODEL  # here, not at the top: buffer.sh / distill.sh import this file
    notes: list[str] = []  # each distinct source once, numbered in order of first use
    for name in DISTILL:
        if SOURCES[name] not in notes:
            notes.append(SOURCES[name])
    recipes = {'MTT (SGD)': {}, 'AST code recipe': AST_EXPERTS}
    out = [
        '<!-- generated by `python presets.py markdown > docs/presets.md` from presets.py (DISTILL, SOURCES); '
        'tests/test_presets.py fails when this file is stale. Do not edit by hand. -->',
        '# Presets',
        '',
        'Every preset lives in `presets.py`. `bash buffer.sh NAME` trains the experts that row needs, '
        '`bash distill.sh NAME` runs the row, and extra flags are appended '
        '(`bash distill.sh cifar10_ipc10 --wandb offline --data_path /data`). No preset means '
        f'`{DEFAULT}`. `python presets.py list` names them; `python presets.py distill NAME` and '
        '`python presets.py buffer NAME` print the flags the scripts pass.',
        '',
        "A preset's buffer flags are derived from its distillation row (same dataset, subset, res, model, zca and "
        'buffer folder), so `bash buffer.sh NAME && bash distill.sh NAME` always finds its experts. '
        "`lr_teacher` is the initial (learnable) student lr; MTT experts train at lr 0.01. The `*_ast` rows are "
        "the AST authors' runs flag for flag: their expert recipe, their student (`--syn_mom 0.9 "
        "--perturb_variant code --middle_steps code`, K-Means on the expert's logits with `--pix_init avg`) and "
        "their evaluation (`--lr_decay ast`). Where a paper and its authors' code "
        'disagree, presets follow the code and the paper\'s version is a flag value '
        '([method.md](method.md), section 4). Memory each preset needs: [memory.md](memory.md).',
        '',
        '## Distillation rows',
        '',
        '| preset | dataset | model | ' + ' | '.join(DOC_COLUMNS) + ' | batch_syn | zca | Iteration / eval_it | '
        'other flags | experts | source |',
        '| --- ' * (len(DOC_COLUMNS) + 9) + '|',
    ]
    for name, row in DISTILL.items():
        data = row['dataset'] + (f" {row['subset']} {row['res']}px" if row['dataset'] == 'ImageNet' else '')
        other = ' '.join(to_flags({k: v for k, v in row.items() if k not in _SHOWN}))
        model = row.get('model') or DEFAULT_MODEL[row['dataset']]
        out.append(f'| `{name}` | {data} | {model} | ' + ' | '.join(_cell(row[c]) for c in DOC_COLUMNS) +
                   f" | {row.get('batch_syn', 'all')} | {'yes' if row.get('zca') else 'no'} | "
                   f"{row['Iteration']} / {row['eval_it']} | {f'`{other}`' if other else ''} | "
                   f'{_experts_label(name)} | [{notes.index(SOURCES[name]) + 1}] |')
    out += ['', 'batch_syn "all": the whole synthetic set per student step (distill.py\'s default).', '',
            '## Experts', '',
            "The experts column reads `recipe, num_experts x train_epochs`. The recipes' buffer.py flags:", '',
            '| recipe | buffer.py flags |', '| --- | --- |']
    for label, flags in recipes.items():
        shown = ' '.join(to_flags(flags))
        out.append(f"| {label} | {f'`{shown}`' if shown else '(buffer.py defaults: SGD, lr 0.01, momentum 0, no weight decay, no lr decay)'} |")
    out += ['', '## What to compare with', '',
            'Published numbers are not our headline statistic. Our headline, for every preset: ' + HEADLINE + '. '
            'The published number beside it, the statistic behind it and the key of ours that is the same '
            'statistic:', '',
            '| paper | statistic behind its number | our key for that statistic |', '| --- | --- | --- |']
    out += [f'| {paper} ({where}) | {what} | {key} |' for paper, (where, what, key) in STATISTICS.items()]
    out += ['', '| preset | published (%) | from | compare with our |', '| --- | --- | --- | --- |']
    for name in DISTILL:
        if name in PUBLISHED:
            paper = paper_of(name)
            key = 'max over it of `eval/<model>_max_selected_on_test`' if paper == 'AST' else \
                '`eval/best_mean_selected_on_test`'
            out.append(f'| `{name}` | {PUBLISHED[name]} | {STATISTICS[paper][0]} | {key} (headline: final set) |')
    out += ['', 'Presets without a row (`digits_*`) have no published number. ' + MTT_REPRINT]
    out += ['', '## Sources', '']
    out += [f'{i}. {note}' for i, note in enumerate(notes, 1)]
    return '\n'.join(out) + '\n'


def plan_table() -> str:
    """docs/memory.md's table: each preset's predicted peak in both unroll modes and the GPUs it fits (the
    memory plan of distill.py --plan; a preset with a reduced batch_syn also with the whole set)."""
    import dataclasses

    import distill
    from trajmatch.memplan import preset_table
    shapes = {name: distill.run_shape(distill.finalize_args(distill.build_parser().parse_args(distill_flags(name))))
              for name in DISTILL}
    whole = {name: dataclasses.replace(s, batch_syn=s.num_syn) for name, s in shapes.items() if s.batch < s.num_syn}
    return preset_table(shapes, whole)


def main(argv: list[str]) -> int:
    if argv[:1] == ['run'] and len(argv) >= 2 and argv[1] in ('buffer', 'distill'):
        run(argv[1], argv[2:])
    if argv[:1] == ['list']:
        print('\n'.join(DISTILL))
        return 0
    if argv[:1] == ['table']:
        print(markdown_table())
        return 0
    if argv == ['markdown']:
        sys.stdout.write(markdown_doc())
        return 0
    if argv == ['plan']:
        print(plan_table())
        return 0
    if len(argv) != 2 or argv[0] not in ('buffer', 'distill'):
        print('usage: python presets.py list | table | markdown | plan | buffer NAME|default | distill NAME|default',
              file=sys.stderr)
        return 2
    if argv[1] == 'default':
        argv = [argv[0], DEFAULT]
    if argv[1] not in DISTILL:
        print(f"error: unknown preset '{argv[1]}'; choose one of: {', '.join(DISTILL)}", file=sys.stderr)
        return 2
    print(' '.join((buffer_flags if argv[0] == 'buffer' else distill_flags)(argv[1])))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
