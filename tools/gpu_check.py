"""The GPU check: everything a first GPU should show, in one run of at most 8 minutes, into one folder.

    python -m tools.gpu_check OUT_DIR                 # on the GPU (--device auto picks CUDA when there is one)
    python -m tools.gpu_check OUT_DIR --device cpu    # the same checks on the CPU at small sizes (a few minutes)
    python -m tools.gpu_check OUT_DIR --quick         # small sizes on the GPU too
    python -m tools.gpu_check OUT_DIR --only memplan bench_cells

Checks, in the order they run (each in a fresh process, with its own time budget, its own CUDA context and
its own peak memory; one failing never stops the others):
  env                 torch, CUDA, cuDNN, NCCL, the device, its memory, CPUs, Python
  cuda_tests          the tests skipped without CUDA (found in tests/), plus the device tests on a GPU
  stacked_vs_one      K stacked networks (stacked.py) against each trained alone, float64 and float32
  bptt_vs_recompute   the hypergradient of both unrolls (matching.py), float64 and float32
  accel_paths         channels_last, bf16 autocast and TF32 (accel.py) against plain fp32
  memplan             memplan.py's predicted growth of one iteration against the measured peak, 4 cells
  bench_cells         seconds per iteration and peak memory at CIFAR shape (ConvNet, 32x32x3, 10 classes)
  torchrun            torchrun with one process: the backend (nccl on CUDA, gloo on CPU), buffer.py, distill.py
  quickstart          the README's bash buffer.sh && bash distill.sh (Digits), fewer experts/iterations if small
OUT_DIR gets gpu_check.json (every number, the environment, the commit, the command line), summary.md (one
line per check), logs/ (each check's output). Exit status 0 when no check failed (skips allowed), else 1.
"""
import argparse
import ast
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from trajmatch.cli import CliParser, UsageError, cli_entry, one_line
from trajmatch.files import atomic_write_bytes, atomic_write_json, check_writable

REPO = Path(__file__).resolve().parent.parent  # every child runs from here (python -m tools.gpu_check)
GiB, MiB = 2**30, 2**20

# ---------------------------------------------------------------- budgets and sizes

TOTAL_BUDGET_S = 480            # 8 minutes on one GPU, every check included
MIN_START_S = 10                # a check is not started with less than this left of the total
CHECK_BUDGET_S = {              # each check's own limit (the total's remainder if that is less)
    'env': 60, 'cuda_tests': 120, 'stacked_vs_one': 60, 'bptt_vs_recompute': 60, 'accel_paths': 90,
    'memplan': 90, 'bench_cells': 120, 'torchrun': 120, 'quickstart': 300,
}
CHECK_NAMES = tuple(CHECK_BUDGET_S)

# the tests that check device placement and the CUDA defaults without a GPU: on a GPU they run with one
DEVICE_TEST_FILES = ('tests/test_device.py', 'tests/test_accel.py')

# quickstart: the README's first command's two steps; small: fewer experts, epochs, iterations, networks
QUICK_BUFFER = ('--num_experts', '2', '--train_epochs', '4')
QUICK_DISTILL = ('--Iteration', '20', '--eval_it', '20', '--max_start_epoch', '2', '--num_eval', '1',
                 '--epoch_eval_train', '100')
QUICKSTART_FLOOR = {False: 0.85, True: 0.2}  # final-set accuracy (full: README 93.56 on a CPU; small: > chance)

# memplan cells (tools.bench.MEMPLAN_CASES): (case, ipc, unroll, syn_steps)
MEMPLAN_CELLS = {False: [('32x32x3', ipc, u, 20) for ipc in (1, 10) for u in ('bptt', 'recompute')],
                 True: [('Digits', 1, u, s) for u in ('bptt', 'recompute') for s in (10, 20)]}
# bench cells at CIFAR shape: (ipc, unroll, syn_steps)
# 'bptt_stock': bptt with PyTorch's own conv/norm/ReLU/pooling (trajmatch.layers.stock_layers), whether our layers'
# hand-written second derivative also pays on the device (measured on a CPU only: docs/benchmarks.md)
BENCH_CELLS = {False: [(ipc, u, 20) for ipc in (1, 10) for u in ('bptt', 'recompute', 'bptt_stock')],
               True: [(1, u, 5) for u in ('bptt', 'recompute', 'bptt_stock')]}
CIFAR_CASE = '32x32x3'

# bounds of the comparisons (relative differences, norm-wise: |a - b| / |b|)
F64_BOUND = 1e-8                # the same computation in two orders, float64: measured ~1e-16 on CPUs
F32_BOUND = 1e-3                # float32, the same: measured 3e-7 (unrolls) and 4e-7 (stacked) on a CPU
ACCEL_BOUND = {'channels_last': 1e-3, 'bf16': 0.05, 'tf32': 0.02}  # train losses against fp32


@dataclass(frozen=True)
class Ctx:
    """What a check knows: the device, the sizes, its scratch folder and log folder, and its deadline."""
    device: str                  # 'cpu', 'cuda', 'cuda:N'
    small: bool                  # --quick or the CPU: small sizes
    work: str                    # this check's scratch folder (under OUT_DIR/work)
    logs: str                    # OUT_DIR/logs
    deadline: float = math.inf   # time.time() by which the check must end

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    @property
    def cuda(self) -> bool:
        return self.dev.type == 'cuda'

    def left(self) -> float:
        return self.deadline - time.time()


class CheckFailed(Exception):
    """A check could not do its work (a command failed, a file is missing): its one-line reason."""


def outcome(ok: bool | None, line: str, **details) -> dict:
    """What a check returns: ok (None: skipped), the summary's numbers, and every number in details."""
    return {'ok': ok, 'line': line, 'details': details}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (norms over every element), in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def sync(dev: torch.device) -> None:
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------- commands a check runs

def child_env(**extra) -> dict:
    """The environment of the commands: this Python first on PATH (buffer.sh runs `python`), no wandb."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')
    return {**os.environ, 'PATH': path, 'WANDB_MODE': 'disabled', 'WANDB_SILENT': 'true', **extra}


def run_session(cmd: list[str], log: str, timeout: float | None, env: dict) -> int | None:
    """Run cmd from the repository root in a session of its own, stdout and stderr into `log`; its exit
    status, or None when it ran past `timeout` (then it and every process it started are killed)."""
    with open(log, 'w') as f:
        f.write('+ ' + ' '.join(cmd) + '\n')
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_session(proc)
            return None
        except BaseException:  # Ctrl-C reaches this process only: the command's own session goes with it
            end_session(proc)
            raise


def end_session(proc: subprocess.Popen) -> None:
    """Kill a command's session (the command and every process it started) and reap the command."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_command(ctx: Ctx, step: str, cmd: list[str], env: dict | None = None, check: bool = True) -> int:
    """cmd within the check's deadline (run_session), its output in logs/<step>.log; its exit status.
    check: a non-zero exit raises CheckFailed with the output's last line (the scripts' one-line error)."""
    log = os.path.join(ctx.logs, f'{step}.log')
    timeout = None if math.isinf(ctx.left()) else max(1.0, ctx.left() - 2)  # 2 s to report before the parent kills
    code = run_session(cmd, log, timeout, env or child_env())
    if code is None:
        raise CheckFailed(f"{step}: no result after {timeout:.0f} s (the check's budget); see {log}")
    if check and code != 0:
        raise CheckFailed(f"{step} exited {code}: {last_line(log)} (see {log})")
    return code


def last_line(path: str) -> str:
    try:
        with open(path, errors='replace') as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return '(no output)'
    return one_line(lines[-1]) if lines else '(no output)'


def json_tail(path: str) -> dict:
    """The JSON object a child printed last."""
    with open(path) as f:
        lines = [ln for ln in f if ln.strip().startswith('{')]
    if not lines:
        raise CheckFailed(f"no result in {path}: {last_line(path)}")
    return json.loads(lines[-1])


def read_final(runs: str) -> tuple[str, dict]:
    """The one run folder under `runs` and its final.json."""
    from trajmatch.runlog import FINAL_FILE
    folders = sorted(p for p in Path(runs).iterdir() if p.is_dir()) if os.path.isdir(runs) else []
    if len(folders) != 1 or not (folders[0] / FINAL_FILE).is_file():
        raise CheckFailed(f"expected one finished run folder with {FINAL_FILE} in {runs}, found "
                          f"{[p.name for p in folders]}")
    return folders[0].name, json.loads((folders[0] / FINAL_FILE).read_text())


def best_of(final: dict) -> tuple[str, float]:
    key = next(k for k in final if k.startswith('best_mean'))
    return key, final[key]


# ---------------------------------------------------------------- the checks

def check_env(ctx: Ctx) -> dict:
    """The software and the device: versions, memory, CPUs; on CUDA a matmul against the CPU's."""
    d = {'python': platform.python_version(), 'platform': platform.platform(), 'torch': torch.__version__,
         'cuda_build': torch.version.cuda, 'cuda_available': torch.cuda.is_available(),
         'cudnn': cudnn_version(),
         'cpu_count': os.cpu_count(), 'cpus_usable': len(os.sched_getaffinity(0)),
         'torch_threads': torch.get_num_threads(), 'omp_num_threads': os.environ.get('OMP_NUM_THREADS'),
         'device': ctx.device}
    if ctx.cuda:
        dev = ctx.dev
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        x = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
        d.update(device_name=props.name, capability=f'{props.major}.{props.minor}',
                 multiprocessors=props.multi_processor_count, device_count=torch.cuda.device_count(),
                 memory_total_gib=total / GiB, memory_free_gib=free / GiB,
                 bf16_supported=torch.cuda.is_bf16_supported(), nccl=nccl_version(),
                 matmul_rel_diff_vs_cpu=rel_diff((x.to(dev) @ x.to(dev)), x.double() @ x.double()))
        ok = d['matmul_rel_diff_vs_cpu'] < F32_BOUND
    else:
        meminfo = _meminfo()
        d.update(device_name=_cpu_model(), memory_total_gib=meminfo.get('MemTotal', 0) / GiB,
                 memory_free_gib=meminfo.get('MemAvailable', 0) / GiB)
        ok = True
    versions = f"torch {d['torch']}, CUDA {d['cuda_build']}, cuDNN {d['cudnn']}"
    versions += f", NCCL {d['nccl']}" if ctx.cuda else ''
    line = (f"{versions}; {d['device_name']}, {d['memory_free_gib']:.1f} of {d['memory_total_gib']:.1f} GiB free; "
            f"{d['cpus_usable']} CPUs; Python {d['python']}")
    return outcome(ok, line, **d)


def nccl_version() -> str | None:
    try:
        from torch.cuda import nccl
        return '.'.join(map(str, nccl.version()))
    except (ImportError, AttributeError, RuntimeError):
        return None


def cudnn_version() -> str | None:
    v = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return None if v is None else f'{v // 10000}.{v % 10000 // 100}.{v % 100}'  # 92400 -> 9.24.0


def _meminfo() -> dict:
    try:
        with open('/proc/meminfo') as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(':', 1) for ln in f)}
    except OSError:
        return {}


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'CPU'


def cuda_only_tests(tests_dir: Path = REPO / 'tests') -> list[str]:
    """Node ids of the tests skipped without CUDA: a test (or a file, by its pytestmark) whose skip
    decorator mentions cuda, read from the source with `ast`."""
    ids = []
    for path in sorted(tests_dir.glob('test_*.py')):
        src = path.read_text()
        rel = path.relative_to(tests_dir.parent).as_posix()  # a node id from the repository root
        found = []
        for node in ast.parse(src, str(path)).body:
            if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == 'pytestmark' for t in node.targets):
                if _cuda_skip(ast.get_source_segment(src, node.value)):
                    found = [rel]
                    break
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.lower().startswith('test'):
                if any(_cuda_skip(ast.get_source_segment(src, dec)) for dec in node.decorator_list):
                    found.append(f'{rel}::{node.name}')
        ids += found
    return ids


def _cuda_skip(text: str | None) -> bool:
    return bool(text) and 'skip' in text and 'cuda' in text.lower()


def junit_counts(xml_path: str) -> dict:
    """Passed, failed and skipped test ids from pytest's --junitxml file."""
    import xml.etree.ElementTree as ET
    out = {'passed': [], 'failed': [], 'skipped': []}
    for case in ET.parse(xml_path).getroot().iter('testcase'):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        out['failed' if kinds & {'failure', 'error'} else 'skipped' if 'skipped' in kinds else 'passed'].append(name)
    return out


def check_cuda_tests(ctx: Ctx) -> dict:
    """pytest on the tests skipped without CUDA; on a GPU also the device tests (they use a fake CUDA device
    and resolve the CUDA defaults, so far only on machines without one)."""
    marked = cuda_only_tests()
    targets = marked + (list(DEVICE_TEST_FILES) if ctx.cuda else [])
    if not targets:
        return outcome(None, 'no test is marked as needing CUDA', tests=[])
    xml = os.path.join(ctx.work, 'pytest.xml')
    code = run_command(ctx, 'cuda_tests-pytest', [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider',
                                                  '--junitxml', xml, *targets], check=False)
    if not os.path.isfile(xml):
        raise CheckFailed(f"pytest exited {code} without a report: "
                          f"{last_line(os.path.join(ctx.logs, 'cuda_tests-pytest.log'))}")
    counts = junit_counts(xml)
    n = {k: len(v) for k, v in counts.items()}
    details = dict(targets=targets, marked_cuda=marked, exit_status=code, **counts)
    if n['failed'] or code not in (0, 5):
        return outcome(False, f"{n['failed']} failed: {', '.join(counts['failed'][:3])}; {n['passed']} passed, "
                              f"{n['skipped']} skipped", **details)
    if not n['passed']:
        return outcome(None, f"skipped (no CUDA): {n['skipped']} test(s) marked as needing CUDA "
                             f"({', '.join(marked)})", **details)
    return outcome(True, f"{n['passed']} passed, {n['skipped']} skipped ({len(marked)} marked as needing CUDA "
                         f"+ {', '.join(DEVICE_TEST_FILES) if ctx.cuda else 'nothing else'})", **details)


@contextlib.contextmanager
def default_dtype(dtype):
    """torch.set_default_dtype for a with-block: the networks evaluation.py builds are then of that dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def check_stacked_vs_one(ctx: Ctx) -> dict:
    """As tests/test_stacked.py, on the device: 3 networks trained 4 epochs stacked (one vmapped
    function) and each alone, weights compared; and evaluate_set's stacked and one-at-a-time paths."""
    from trajmatch.data import load_dataset
    from trajmatch.evaluation import evaluate_set, fresh_network, random_real
    from trajmatch.stacked import NetStack, StackedSGD
    from trajmatch.training import OneNet, train_epoch
    dev, shape, seeds = ctx.dev, (1, 10, (8, 8)), [5, 6, 7]
    eval_epochs = 10 if ctx.small else 30
    data = load_dataset('Digits')
    images, labels = random_real(data, 3, torch.Generator().manual_seed(0))
    test = (data.images_test.to(dev), data.labels_test.to(dev))
    d = {'eval_epochs': eval_epochs}
    for dtype in (torch.float64, torch.float32):
        x, y = images.to(dev, dtype), labels.to(dev)
        alone = [fresh_network('ConvNetD2', shape, s, dev).to(dtype) for s in seeds]
        for net, s in zip(alone, seeds):
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            gen = torch.Generator().manual_seed(s)
            for _ in range(4):
                train_epoch(OneNet(net), x, y, opt, batch_size=16, generators=[gen])
        stack = NetStack([fresh_network('ConvNetD2', shape, s, dev).to(dtype) for s in seeds])
        opt = StackedSGD(stack.params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        for _ in range(4):
            train_epoch(stack, x, y, opt, batch_size=16, generators=gens)
        name = str(dtype).replace('torch.', '')
        d[f'{name}_weights_rel_diff'] = max(rel_diff(stack.params[n][k], p) for k, net in enumerate(alone)
                                            for n, p in net.named_parameters())
        with default_dtype(dtype):
            kw = dict(lr=0.01, epochs=eval_epochs, num_eval=3, seed=11, progress=False)
            tx = (test[0].to(dtype), test[1])
            accs = {mode: evaluate_set(['ConvNetD2'], shape, x, y, *tx, parallel=mode, **kw)[0].accs
                    for mode in ('loop', 'stack')}
        d[f'{name}_accs_loop'], d[f'{name}_accs_stack'] = accs['loop'], accs['stack']
        d[f'{name}_accs_max_diff'] = max(abs(a - b) for a, b in zip(accs['loop'], accs['stack']))
    ok = (d['float64_weights_rel_diff'] < F64_BOUND and d['float64_accs_max_diff'] == 0
          and d['float32_weights_rel_diff'] < F32_BOUND)
    line = (f"weights after 4 epochs, stacked vs alone: float64 {d['float64_weights_rel_diff']:.1e} (bound "
            f"{F64_BOUND:g}), float32 {d['float32_weights_rel_diff']:.1e} (bound {F32_BOUND:g}); evaluate_set "
            f"stack vs loop accuracies: float64 equal={d['float64_accs_max_diff'] == 0}, float32 max diff "
            f"{d['float32_accs_max_diff']:.4f}")
    return outcome(ok, line, **d)


def check_bptt_vs_recompute(ctx: Ctx) -> dict:
    """As tests/test_matching.py, on the device: match_and_backward with Unroll(mode='bptt') and 'recompute'
    (momentum 0.9, one intermediate term), gradients of the images and of syn_lr compared."""
    from trajmatch.matching import Targets, Unroll, match_and_backward
    from networks import get_network
    from reparam_module import ReparamModule
    steps, ipc = (5, 1) if ctx.small else (20, 2)
    d = {'syn_steps': steps, 'ipc': ipc, 'model': 'ConvNetD2'}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        student = ReparamModule(get_network('ConvNetD2', 1, 10, (8, 8)).to(ctx.dev, dtype))
        images = torch.randn(10 * ipc, 1, 8, 8, generator=gen, dtype=dtype).to(ctx.dev)
        labels = torch.arange(10).repeat_interleave(ipc).to(ctx.dev)
        start = student.flat_param().detach()
        target = start + 0.01 * torch.randn(start.shape, generator=gen, dtype=dtype).to(ctx.dev)
        targets = Targets(start, target, [(steps // 2, start + 0.5 * (target - start), 1.0)])
        got = {}
        for mode in ('bptt', 'recompute'):
            x = images.clone().requires_grad_(True)
            alpha = torch.tensor(0.01, dtype=dtype, device=ctx.dev, requires_grad=True)
            loss, _ = match_and_backward(student, x, labels, alpha, start, targets,
                                         Unroll(syn_steps=steps, batch_syn=5 * ipc, syn_mom=0.9, mode=mode),
                                         generator=torch.Generator().manual_seed(2))
            got[mode] = (loss, x.grad, alpha.grad)
        name = str(dtype).replace('torch.', '')
        (lb, ib, ab), (lr_, ir, ar) = got['bptt'], got['recompute']
        d[f'{name}_loss_rel_diff'] = rel_diff(lr_, lb)
        d[f'{name}_images_grad_rel_diff'] = rel_diff(ir, ib)
        d[f'{name}_syn_lr_grad_rel_diff'] = rel_diff(ar, ab)
        d[f'{name}_images_grad_norm'], d[f'{name}_syn_lr_grad'] = float(ib.norm()), float(ab)
    worst = {n: max(d[f'{n}_images_grad_rel_diff'], d[f'{n}_syn_lr_grad_rel_diff']) for n in ('float64', 'float32')}
    ok = worst['float64'] < F64_BOUND and worst['float32'] < F32_BOUND and d['float32_images_grad_norm'] > 0
    line = (f"syn_steps {steps}, recompute vs bptt, images.grad / syn_lr.grad: float64 "
            f"{d['float64_images_grad_rel_diff']:.1e} / {d['float64_syn_lr_grad_rel_diff']:.1e} (bound {F64_BOUND:g}), "
            f"float32 {d['float32_images_grad_rel_diff']:.1e} / {d['float32_syn_lr_grad_rel_diff']:.1e} "
            f"(bound {F32_BOUND:g})")
    return outcome(ok, line, **d)


def _accel_problem(ctx: Ctx):
    """(model, data shape, images, labels, batch, epochs): Digits' real images when small, else random
    CIFAR-shaped ones (2,048 images; the numbers compared do not depend on what they show)."""
    if ctx.small:
        from trajmatch.data import load_dataset
        from trajmatch.evaluation import random_real
        images, labels = random_real(load_dataset('Digits'), 5, torch.Generator().manual_seed(0))
        return 'ConvNetD2', (1, 10, (8, 8)), images.to(ctx.dev), labels.to(ctx.dev), 32, 3
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2048, 3, 32, 32, generator=gen).to(ctx.dev)
    labels = torch.randint(0, 10, (2048,), generator=gen).to(ctx.dev)
    return 'ConvNet', (3, 10, (32, 32)), images, labels, 256, 3


def _train_with(ctx: Ctx, problem, accel, tf32: bool) -> dict:
    """A fresh network (seed 0) trained a few epochs under `accel` (and TF32 or not): losses, weights, time."""
    from trajmatch.accel import set_tf32
    from trajmatch.evaluation import fresh_network
    from trajmatch.training import OneNet, train_epoch
    model, shape, images, labels, batch, epochs = problem
    set_tf32(tf32)
    try:
        net = accel.net(fresh_network(model, shape, 0, ctx.dev))
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        losses, times = [], []
        for _ in range(epochs):
            sync(ctx.dev)
            t0 = time.perf_counter()
            loss, _ = train_epoch(OneNet(net), images, labels, opt, batch_size=batch, generators=[gen], accel=accel)
            losses.append(loss.item())
            times.append(time.perf_counter() - t0)
    finally:
        set_tf32(False)
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    return {'losses': losses, 'sec_per_epoch': min(times[1:] or times),  # the first epoch warms up
            'weights_fp32': all(p.dtype == torch.float32 for p in net.parameters()),
            'channels_last': first.weight.is_contiguous(memory_format=torch.channels_last)}


def _tf32_matching(ctx: Ctx) -> float:
    """Relative difference of a matching step's image gradient with TF32 on vs off (TF32 reaches the unroll)."""
    from trajmatch.accel import set_tf32
    from trajmatch.matching import Targets, Unroll, match_and_backward
    from networks import get_network
    from reparam_module import ReparamModule
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    student = ReparamModule(get_network('ConvNet', 3, 10, (32, 32)).to(ctx.dev))
    images = torch.randn(10, 3, 32, 32, generator=gen).to(ctx.dev)
    labels = torch.arange(10).to(ctx.dev)
    w0 = student.flat_param().detach()
    targets = Targets(w0, w0 + 0.01 * torch.randn(w0.shape, generator=gen).to(ctx.dev))
    grads = []
    for on in (False, True):
        set_tf32(on)
        try:
            x = images.clone().requires_grad_(True)
            lr = torch.tensor(0.01, device=ctx.dev, requires_grad=True)
            match_and_backward(student, x, labels, lr, w0, targets, Unroll(syn_steps=10, batch_syn=10),
                               generator=torch.Generator().manual_seed(1))
            grads.append(x.grad)
        finally:
            set_tf32(False)
    return rel_diff(grads[1], grads[0])


def check_accel_paths(ctx: Ctx) -> dict:
    """accel.py's paths against plain fp32 (as tests/test_accel.py): the same network trained a few epochs
    with channels_last, with bf16 autocast and with TF32 (CUDA, compute capability >= 8 only); each path's
    train losses against fp32's, and its seconds per epoch."""
    from trajmatch.accel import FP32, Accel
    problem = _accel_problem(ctx)
    ref = _train_with(ctx, problem, FP32, tf32=False)
    d = {'model': problem[0], 'images': int(problem[2].shape[0]), 'epochs': problem[5],
         'fp32': {'losses': ref['losses'], 'sec_per_epoch': ref['sec_per_epoch']}}
    tf32_ok = ctx.cuda and torch.cuda.get_device_capability(ctx.dev)[0] >= 8
    paths = {'channels_last': (Accel(channels_last=True), False), 'bf16': (Accel(bf16=True), False),
             'tf32': (FP32, True)}
    verdicts = {}
    for name, (accel, tf32) in paths.items():
        if name == 'tf32' and not tf32_ok:
            d[name] = {'ok': None, 'why': 'not applicable on a CPU' if not ctx.cuda else 'needs compute capability 8+'}
            verdicts[name] = None
            continue
        got = _train_with(ctx, problem, accel, tf32)
        diff = max(abs(a - b) / abs(b) for a, b in zip(got['losses'], ref['losses']))
        ran = got['losses'] != ref['losses']  # bf16 must change the numbers: it really ran (TF32: reported)
        took = {'channels_last': got['channels_last'], 'bf16': ran, 'tf32': True}[name]
        ok = diff < ACCEL_BOUND[name] and got['weights_fp32'] and took
        d[name] = {'ok': ok, 'losses': got['losses'], 'loss_rel_diff': diff, 'changed_the_numbers': ran,
                   'sec_per_epoch': got['sec_per_epoch'], 'speedup': ref['sec_per_epoch'] / got['sec_per_epoch'],
                   'weights_fp32': got['weights_fp32'], 'channels_last_weights': got['channels_last']}
        verdicts[name] = ok
    if tf32_ok:
        d['tf32']['matching_images_grad_rel_diff'] = _tf32_matching(ctx)
    ok = all(v is not False for v in verdicts.values())
    parts = [f"{n} {_diff_text(d[n])}" for n in paths]
    speed = ', '.join(f"{n} {d[n]['speedup']:.2f}x" for n in paths if d[n]['ok'] is not None)
    line = (f"train-loss rel diff vs fp32 ({problem[0]}, {problem[5]} epochs): {', '.join(parts)} (bounds "
            f"{', '.join(f'{k} {v:g}' for k, v in ACCEL_BOUND.items())}); speed vs fp32: {speed}"
            + (f"; TF32 matching grad rel diff {d['tf32']['matching_images_grad_rel_diff']:.1e}" if tf32_ok else
               '; TF32 not applicable' + (' (CPU)' if not ctx.cuda else '')))
    return outcome(ok, line, **d)


def _diff_text(path: dict) -> str:
    return 'n/a' if path['ok'] is None else f"{path['loss_rel_diff']:.1e}"


def check_memplan(ctx: Ctx) -> dict:
    """memplan.py's predicted growth of one iteration against the measured peak (tools.bench's memplan
    child, a fresh process per cell: CUDA's max_memory_allocated, on a CPU the peak RSS); within the margin
    --unroll auto allows (memplan.MARGIN) both ways."""
    from tools.bench import MEMPLAN_CASES
    from trajmatch.memplan import MARGIN, RunShape, make_plan
    margin = MARGIN['cuda' if ctx.cuda else 'cpu']
    env = child_env(MALLOC_MMAP_THRESHOLD_='65536', OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    rows = []
    for case, ipc, unroll, steps in MEMPLAN_CELLS[ctx.small]:
        model, channel, classes, im_size = MEMPLAN_CASES[case]
        shape = RunShape(model, channel, classes, im_size, ipc, classes * ipc, steps)
        predicted = make_plan(shape).growth(unroll) / MiB
        step = f'memplan-{case}-ipc{ipc}-{unroll}-{steps}'
        run_command(ctx, step, [sys.executable, '-m', 'tools.bench', '--child', 'memplan', case, unroll, str(steps),
                                str(ipc), ctx.device], env=env)
        row = {**json_tail(os.path.join(ctx.logs, f'{step}.log')), 'predicted_mib': predicted}
        row['error'] = predicted / row['measured_mib'] - 1
        row['ok'] = row['measured_mib'] <= predicted * (1 + margin) and predicted <= row['measured_mib'] * (1 + margin)
        rows.append(row)
    line = '; '.join(f"{r['case']} ipc {r['ipc']} {r['unroll']} {r['syn_steps']}: {r['predicted_mib']:.0f} / "
                     f"{r['measured_mib']:.0f} MiB ({r['error']:+.1%})" for r in rows)
    return outcome(all(r['ok'] for r in rows), f"predicted / measured: {line} (margin {margin:.0%})", cells=rows,
                   margin=margin, measure='torch.cuda.max_memory_allocated' if ctx.cuda else 'peak RSS (VmHWM)')


def bench_cell(unroll: str, syn_steps: int, ipc: int, device: str) -> dict:
    """One benchmark cell at CIFAR shape, in this (fresh) process: ConvNet (width 128) on random 32x32x3
    images, 10 classes, batch_syn = the whole set; seconds per iteration (median of tools.bench.TIMED_ITERS
    after a warm-up) and the peak memory growth, as tools.bench.distill_child measures them. unroll
    'bptt_stock': bptt through PyTorch's stock layers instead of trajmatch/layers.py's."""
    from tools.bench import MEMPLAN_CASES, random_cell, time_step
    from trajmatch.matching import Unroll, match_and_backward
    model, channel, classes, im_size = MEMPLAN_CASES[CIFAR_CASE]
    dev = torch.device(device)
    student, images, labels, syn_lr, w0, targets, gen = random_cell(CIFAR_CASE, ipc, dev, stock=unroll.endswith('_stock'))
    u = Unroll(syn_steps=syn_steps, batch_syn=images.shape[0], mode=unroll.split('_')[0])

    def step():
        images.grad = syn_lr.grad = None
        match_and_backward(student, images, labels, syn_lr, w0, targets, u, generator=gen)

    return {'model': model, 'shape': f'{channel}x{im_size[0]}x{im_size[1]}', 'classes': classes, 'ipc': ipc,
            'unroll': unroll, 'syn_steps': syn_steps, **time_step(step, dev), 'device': device}


def check_bench_cells(ctx: Ctx) -> dict:
    """The benchmark's distill cells at CIFAR shape, one fresh process per cell (its own peak)."""
    rows = []
    for ipc, unroll, steps in BENCH_CELLS[ctx.small]:
        step = f'bench-ipc{ipc}-{unroll}-{steps}'
        run_command(ctx, step, [sys.executable, '-m', 'tools.gpu_check', '--bench_cell', unroll, str(steps), str(ipc),
                                ctx.device])
        rows.append(json_tail(os.path.join(ctx.logs, f'{step}.log')))
    ok = all(math.isfinite(r['sec_per_iter']) and r['sec_per_iter'] > 0 for r in rows)
    line = '; '.join(f"ipc {r['ipc']} {r['unroll']} {r['syn_steps']} steps: {r['sec_per_iter']:.3f} s/it, "
                     f"+{r['peak_mib']:.0f} MiB" for r in rows)
    return outcome(ok, f"ConvNet 3x32x32: {line}", cells=rows)


def dist_probe(backend: str, device: str) -> dict:
    """Under torchrun: join the process group with `backend`, all_reduce a tensor on the rank's device,
    barrier, leave. (distill.py with one process makes no process group: this is what runs the backend.)"""
    from datetime import timedelta
    import torch.distributed as dist
    local = int(os.environ.get('LOCAL_RANK', 0))
    dev = torch.device('cuda', local) if device.startswith('cuda') else torch.device('cpu')
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
    try:
        t = torch.arange(4.0, device=dev) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        dist.barrier(**({'device_ids': [local]} if backend == 'nccl' else {}))
        expected = [float(i) * dist.get_world_size() * (dist.get_world_size() + 1) / 2 for i in range(4)]
        return {'backend': dist.get_backend(), 'world_size': dist.get_world_size(), 'rank': dist.get_rank(),
                'all_reduce': t.cpu().tolist(), 'all_reduce_ok': t.cpu().tolist() == expected,
                'device': str(dev), 'nccl': nccl_version() if backend == 'nccl' else None}
    finally:
        dist.destroy_process_group()


def check_torchrun(ctx: Ctx) -> dict:
    """torchrun --standalone --nproc_per_node=1: the backend probe (nccl on CUDA, gloo on a CPU), then
    buffer.py (2 experts) and distill.py (a few iterations) as docs/distributed.md runs them."""
    backend = 'nccl' if ctx.cuda else 'gloo'
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1']
    env = child_env(OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    run_command(ctx, 'torchrun-probe', launch + ['-m', 'tools.gpu_check', '--dist_probe', backend, ctx.device], env=env)
    probe = json_tail(os.path.join(ctx.logs, 'torchrun-probe.log'))
    buffers, runs = os.path.join(ctx.work, 'buffers'), os.path.join(ctx.work, 'runs')
    t0 = time.perf_counter()
    run_command(ctx, 'torchrun-buffer', launch + ['buffer.py', '--num_experts', '2', '--train_epochs', '3',
                                                  '--model', 'ConvNetD2', '--buffer_path', buffers,
                                                  '--device', ctx.device], env=env)
    iterations = 3 if ctx.small else 20
    run_command(ctx, 'torchrun-distill', launch + [
        'distill.py', '--model', 'ConvNetD2', '--ipc', '2', '--syn_steps', '5', '--expert_epochs', '1',
        '--max_start_epoch', '2', '--Iteration', str(iterations), '--eval_it', '1000', '--num_eval', '1',
        '--epoch_eval_train', '20', '--buffer_path', buffers, '--run_dir', runs, '--device', ctx.device,
        '--wandb', 'disabled'], env=env)
    folder, final = read_final(runs)
    ok = probe['all_reduce_ok'] and probe['backend'] == backend and math.isfinite(final['final_mean'])
    line = (f"{backend} on 1 process: all_reduce {'ok' if probe['all_reduce_ok'] else 'WRONG'}"
            + (f" (NCCL {probe['nccl']})" if probe.get('nccl') else '')
            + f"; torchrun buffer.py + distill.py ({iterations} it) {time.perf_counter() - t0:.0f} s, final set "
              f"{100 * final['final_mean']:.1f}% (one process: distill.py makes no process group)")
    if not ctx.cuda:
        line += '; CPU: gloo, not nccl'
    return outcome(ok, line, probe=probe, run=folder, final=final, backend=backend)


def check_quickstart(ctx: Ctx) -> dict:
    """The README's two commands, bash buffer.sh && bash distill.sh (Digits, preset digits_ipc1) on the
    device, into this check's work folder; small: 2 experts x 4 epochs, 20 iterations, 1 network."""
    buffers, runs = os.path.join(ctx.work, 'buffers'), os.path.join(ctx.work, 'runs')
    where = ['--buffer_path', buffers, '--device', ctx.device]
    t0 = time.perf_counter()
    run_command(ctx, 'quickstart-buffer', ['bash', 'buffer.sh', *where, *(QUICK_BUFFER if ctx.small else ())])
    t1 = time.perf_counter()
    run_command(ctx, 'quickstart-distill', ['bash', 'distill.sh', *where, '--run_dir', runs, '--wandb', 'disabled',
                                            *(QUICK_DISTILL if ctx.small else ())])
    t2 = time.perf_counter()
    folder, final = read_final(runs)
    best_key, best = best_of(final)
    floor = QUICKSTART_FLOOR[ctx.small]
    ok = math.isfinite(final['final_mean']) and final['final_mean'] >= floor
    line = (f"buffer.sh {t1 - t0:.0f} s, distill.sh {t2 - t1:.0f} s ({'small' if ctx.small else 'full'} sizes); "
            f"final set {100 * final['final_mean']:.2f}% ({final['final_model']}; floor {100 * floor:.0f}%), "
            f"best {100 * best:.2f}% at it {final['best_it']}, syn_lr {final['syn_lr']:.2e}, "
            f"{final['skipped_steps']} skipped steps")
    return outcome(ok, line, run=folder, final=final, best_key=best_key, buffer_s=t1 - t0, distill_s=t2 - t1,
                   flags={'buffer': list(QUICK_BUFFER) if ctx.small else [],
                          'distill': list(QUICK_DISTILL) if ctx.small else []})


CHECKS = {'env': check_env, 'cuda_tests': check_cuda_tests, 'stacked_vs_one': check_stacked_vs_one,
          'bptt_vs_recompute': check_bptt_vs_recompute, 'accel_paths': check_accel_paths, 'memplan': check_memplan,
          'bench_cells': check_bench_cells, 'torchrun': check_torchrun, 'quickstart': check_quickstart}
assert tuple(CHECKS) == CHECK_NAMES


# ---------------------------------------------------------------- running a check

def run_check(name: str, ctx: Ctx) -> dict:
    """One check in this process: its outcome, timed; an exception becomes ok False with its one-line
    error and the traceback's last lines."""
    from trajmatch.accel import set_tf32
    set_tf32(False)  # what the scripts do by default (also turns off cuDNN's own TF32 default)
    os.makedirs(ctx.work, exist_ok=True)
    os.makedirs(ctx.logs, exist_ok=True)
    start = time.perf_counter()
    try:
        result = {'name': name, **CHECKS[name](ctx)}
    except CheckFailed as e:
        result = {'name': name, 'ok': False, 'error': one_line(e)}
    except Exception as e:  # a check's bug or the device's: recorded, the other checks still run
        result = {'name': name, 'ok': False, 'error': f'{type(e).__name__}: {one_line(e)}',
                  'traceback': traceback.format_exc().strip().splitlines()[-8:]}
    result['seconds'] = time.perf_counter() - start
    return result


def failed(name: str, error: str, seconds: float, **extra) -> dict:
    return {'name': name, 'ok': False, 'error': error, 'seconds': seconds, **extra}


def run_in_child(name: str, out_dir: str, device: str, small: bool, timeout: float) -> dict:
    """One check in a fresh process (its own session, so a timeout ends it and every process it started);
    its result comes back in OUT_DIR/checks/NAME.json, its output goes to OUT_DIR/logs/NAME.log."""
    result_file = os.path.join(out_dir, 'checks', f'{name}.json')
    log = os.path.join(out_dir, 'logs', f'{name}.log')
    for path in (result_file, log):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(result_file):
        os.remove(result_file)
    cmd = [sys.executable, '-m', 'tools.gpu_check', out_dir, '--device', device, '--child', name,
           '--deadline', repr(time.time() + timeout), *(['--quick'] if small else [])]
    start = time.perf_counter()
    code = run_session(cmd, log, timeout, child_env())
    if code is None:
        return failed(name, f'timed out after {timeout:.0f} s (its budget); see {log}', time.perf_counter() - start)
    if not os.path.exists(result_file):
        return failed(name, f'the check process exited {code} without a result: {last_line(log)}',
                      time.perf_counter() - start)
    with open(result_file) as f:
        result = json.load(f)
    result['seconds_in_check'], result['seconds'] = result['seconds'], time.perf_counter() - start  # + start-up
    return result


def run_checks(out_dir: str, device: str, small: bool, names: list[str], budget: float, report: dict,
               keep: bool = False) -> list[dict]:
    """Every check in order, each within its budget and the total's remainder; the report is rewritten
    after each check, so an interrupted run leaves what it measured."""
    start = time.perf_counter()
    for name in names:
        left = budget - (time.perf_counter() - start)
        if left < MIN_START_S:
            result = failed(name, f'not run: {left:.0f} s left of the total budget {budget:.0f} s', 0.0)
        else:
            result = run_in_child(name, out_dir, device, small, min(CHECK_BUDGET_S[name], left))
        report['checks'].append(result)
        report['total_seconds'] = time.perf_counter() - start
        if name == 'env' and result.get('details'):
            report['environment'] = result['details']
        write_outputs(out_dir, report)
        print(check_line(result), flush=True)
    if not keep:
        shutil.rmtree(os.path.join(out_dir, 'work'), ignore_errors=True)  # experts and runs: megabytes
    return report['checks']


# ---------------------------------------------------------------- output

def status_word(ok: bool | None) -> str:
    return {True: 'PASS', False: 'FAIL', None: 'SKIP'}[ok]


def check_line(r: dict) -> str:
    text = r.get('line', '') if r['ok'] is not False or 'error' not in r else f"error: {r['error']}"
    if r['ok'] is False and 'error' not in r:
        text = f"out of bounds: {text}"
    return f"{status_word(r['ok'])}  {r['name']:<18} {r['seconds']:7.1f} s  {text}"


def exit_status(checks: list[dict]) -> int:
    return 1 if any(r['ok'] is False for r in checks) else 0


def summary_text(report: dict) -> str:
    checks, env = report['checks'], report.get('environment') or {}
    counts = {w: sum(status_word(r['ok']) == w for r in checks) for w in ('PASS', 'FAIL', 'SKIP')}
    git = report.get('git') or {}
    commit = (git.get('commit') or 'unknown')[:12] + (' (with uncommitted changes)' if git.get('dirty') else '')
    device = report['device'] + (f" ({env['device_name']})" if env.get('device_name') else '')
    versions = (f"torch {env['torch']}, CUDA {env['cuda_build']}, cuDNN {env['cudnn']}" if env
                else 'no env check in this run')
    head = [f"# GPU check: {device}, {report.get('total_seconds', 0):.0f} s (budget {report['budget_s']:.0f} s)", '',
            f"commit {commit}; {versions}; {'small' if report['small'] else 'full'} sizes; started "
            f"{report['started_utc']}",
            f"command: `{' '.join(report['command'])}`", '',
            f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
            f"(of {len(report['names'])} checks; every number: gpu_check.json; output: logs/)", '', '```']
    return '\n'.join(head + [check_line(r) for r in checks] + ['```', ''])


def write_outputs(out_dir: str, report: dict) -> None:
    atomic_write_json(report, os.path.join(out_dir, 'gpu_check.json'))
    atomic_write_bytes(summary_text(report).encode(), os.path.join(out_dir, 'summary.md'))


def git_state() -> dict:
    def git(*args):
        done = subprocess.run(['git', '-C', str(REPO), *args], capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else None
    try:
        status = git('status', '--porcelain')
        return {'commit': git('rev-parse', 'HEAD'), 'branch': git('rev-parse', '--abbrev-ref', 'HEAD'),
                'dirty': None if status is None else bool(status)}
    except (OSError, subprocess.TimeoutExpired):
        return {'commit': None, 'branch': None, 'dirty': None}


def new_report(device: str, small: bool, names: list[str], budget: float, argv: list[str]) -> dict:
    return {'tool': 'tools.gpu_check', 'command': [os.path.basename(sys.executable), '-m', 'tools.gpu_check', *argv],
            'git': git_state(), 'device': device, 'small': small, 'names': names, 'budget_s': budget,
            'started_utc': datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'), 'total_seconds': 0.0,
            'environment': None, 'checks': []}


# ---------------------------------------------------------------- command line

def parse(argv):
    p = CliParser(prog='python -m tools.gpu_check', description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out_dir', nargs='?', help='folder for gpu_check.json, summary.md and logs/')
    p.add_argument('--device', default='auto', help='auto (CUDA when there is one), cpu, cuda, cuda:N')
    p.add_argument('--quick', action='store_true', help='small sizes on the GPU too (always on a CPU)')
    p.add_argument('--only', nargs='+', choices=CHECK_NAMES, help='run these checks only')
    p.add_argument('--budget', type=float, default=TOTAL_BUDGET_S, help='total seconds (default: 480)')
    p.add_argument('--keep', action='store_true', help="keep the work folders (the checks' experts and runs)")
    p.add_argument('--child', choices=CHECK_NAMES, help=argparse.SUPPRESS)
    p.add_argument('--deadline', type=float, default=math.inf, help=argparse.SUPPRESS)
    p.add_argument('--bench_cell', nargs=4, help=argparse.SUPPRESS)
    p.add_argument('--dist_probe', nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


@cli_entry
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.bench_cell:
        unroll, steps, ipc, device = args.bench_cell
        print(json.dumps(bench_cell(unroll, int(steps), int(ipc), device)))
        return 0
    if args.dist_probe:
        print(json.dumps(dist_probe(*args.dist_probe)))
        return 0
    if not args.out_dir:
        raise UsageError('give OUT_DIR, the folder for gpu_check.json and summary.md (see --help)')
    out_dir = os.path.abspath(args.out_dir)
    if args.child:
        ctx = Ctx(args.device, args.quick, os.path.join(out_dir, 'work', args.child), os.path.join(out_dir, 'logs'),
                  args.deadline)
        atomic_write_json(run_check(args.child, ctx), os.path.join(out_dir, 'checks', f'{args.child}.json'))
        return 0
    if not args.budget > 0:
        raise UsageError(f'--budget {args.budget:g}: give a positive number of seconds')
    from trajmatch.runtime import pick_device
    device = str(pick_device(args.device))
    check_writable(out_dir, 'OUT_DIR')
    small = args.quick or device == 'cpu'
    names = list(args.only or CHECK_NAMES)
    report = new_report(device, small, names, args.budget, argv)
    print(f"GPU check on {device} ({'small' if small else 'full'} sizes), {len(names)} checks, budget "
          f"{args.budget:.0f} s; writing {out_dir}", flush=True)
    checks = run_checks(out_dir, device, small, names, args.budget, report, keep=args.keep)
    report['exit_status'] = exit_status(checks)
    write_outputs(out_dir, report)
    print('\n' + summary_text(report), flush=True)
    return report['exit_status']


if __name__ == '__main__':
    sys.exit(main())
