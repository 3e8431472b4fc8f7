"""Benchmarks on the current device: prints a table and writes JSON (bench.json).

    python bench.py                      # everything below
    python bench.py --only distill       # unroll modes x syn_steps x ipc: s/iteration and peak memory
    python bench.py --only expert eval
    python bench.py --only cross          # minutes per cross-architecture network of the Fashion-MNIST study
    python bench.py --only loop           # a whole distill.py iteration (needs bash buffer.sh's experts)
    python bench.py --only memplan        # memplan.py's predicted peak growth vs measured, both unroll modes
Distill numbers come from one fresh subprocess per configuration (Digits, ConvNetD2, batch_syn = all),
so each peak is that configuration's own: on CUDA torch.cuda.max_memory_allocated, on CPU the growth
of the process's peak RSS over its RSS just before the first iteration.
"""
import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from trajmatch.allocator import OPT_OUT, tune_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # children run as python -m tools.bench from here

# ---------------------------------------------------------------- what is measured

UNROLL_MODES = ('bptt', 'recompute')
SYN_STEPS = (10, 20, 40, 80)
IPCS = (1, 10)
TIMED_ITERS = 3          # distill iterations timed, after one warm-up
EVAL_NETS = 5            # networks per evaluation (distill.py's --num_eval default)


def current_rss_mib() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _times(fn, repeats: int) -> list[float]:
    """Wall times of `repeats` calls of fn (no warm-up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_time(fn, repeats: int) -> float:
    """Median wall time of fn over `repeats` calls, after one warm-up call."""
    fn()  # warm-up
    return statistics.median(_times(fn, repeats))


def digits_cell(ipc: int, dev: torch.device):
    """The distill and trajectories children's cell: real Digits images (ipc per class, a leaf), their labels,
    syn_lr, the ConvNetD2 student and the generator that drew the images, seeded 0."""
    from trajmatch.data import load_dataset
    from trajmatch.evaluation import random_real
    from networks import get_network
    from reparam_module import ReparamModule
    torch.manual_seed(0)
    data = load_dataset('Digits')
    gen = torch.Generator().manual_seed(0)
    images, labels = random_real(data, ipc, gen)
    images, labels = images.to(dev).requires_grad_(True), labels.to(dev)
    syn_lr = torch.tensor(0.01, device=dev, requires_grad=True)
    student = ReparamModule(get_network('ConvNetD2', data.channel, data.num_classes, data.im_size).to(dev))
    return student, images, labels, syn_lr, gen


def distill_child(unroll: str, syn_steps: int, ipc: int, device: str) -> dict:
    """One configuration, in this (fresh) process."""
    from trajmatch.matching import Targets, Unroll, match_and_backward
    dev = torch.device(device)
    student, images, labels, syn_lr, gen = digits_cell(ipc, dev)
    w0 = student.flat_param()
    target = w0 + 0.01 * torch.randn(w0.shape, generator=gen).to(dev)  # matching cost does not depend on the values
    targets = Targets(w0, target)

    u = Unroll(syn_steps=syn_steps, batch_syn=images.shape[0], mode=unroll)

    def step():
        images.grad = syn_lr.grad = None
        match_and_backward(student, images, labels, syn_lr, w0, targets, u, generator=gen)

    return {'unroll': unroll, 'syn_steps': syn_steps, 'ipc': ipc, **time_step(step, dev), 'device': device}


def time_step(step, dev: torch.device, iters: int = TIMED_ITERS) -> dict:
    """Median seconds of step() over `iters` calls after a warm-up (each call's seconds in 'times'), the
    peak memory growth over all of them (CUDA: max_memory_allocated; CPU: peak RSS), and per timed call
    the system time and minor page faults (the allocator's cost: allocator.py) with the malloc settings
    in force. The warm-up's first touch of fresh memory is outside the rusage window: the figures are
    the steady state a long run sees."""
    def synced():
        step()
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)

    base = current_rss_mib()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    synced()  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = _times(synced, iters)
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak = (torch.cuda.max_memory_allocated(dev) - base_cuda) / 2**20 if dev.type == 'cuda' else peak_rss_mib() - base
    return {'sec_per_iter': statistics.median(times), 'times': times, 'peak_mib': peak,
            'sys_sec_per_iter': (after.ru_stime - before.ru_stime) / iters,
            'minor_faults_per_iter': (after.ru_minflt - before.ru_minflt) / iters,
            'malloc': os.environ.get(OPT_OUT, 'tuned')}


def bench_distill(device: str) -> list[dict]:
    rows = []
    for ipc in IPCS:
        for unroll in UNROLL_MODES:
            for steps in SYN_STEPS:
                rows.append(run_child('distill', unroll, steps, ipc, device))
                r = rows[-1]
                print(f"distill ipc {ipc:>2} {unroll:>9} syn_steps {steps:>2}: {r['sec_per_iter']:.3f} s/it, "
                      f"peak +{r['peak_mib']:.1f} MiB, sys {r['sys_sec_per_iter']:.3f} s/it, "
                      f"{r['minor_faults_per_iter']:.0f} faults/it (malloc {r['malloc']})", flush=True)
    return rows


# memplan cells: (model, channels, image size, classes); random images (memory does not depend on the values)
MEMPLAN_CASES = {'Digits': ('ConvNetD2', 1, 10, (8, 8)), '32x32x3': ('ConvNet', 3, 10, (32, 32)),
                 '28x28x1': ('ConvNetW32', 1, 10, (28, 28))}
MEMPLAN_RAM_SHARE = 0.4  # run a cell only if its predicted growth is below this share of the free RAM


def random_cell(case: str, ipc: int, dev: torch.device, stock: bool = False):
    """A MEMPLAN_CASES cell on random images (time and memory do not depend on the values): the student,
    images, labels, syn_lr, w0, targets and the generator, seeded 0. stock: the student's convolution, norm,
    ReLU and pooling are PyTorch's own (trajmatch.layers.stock_layers), not trajmatch/layers.py's."""
    from trajmatch.layers import stock_layers
    from trajmatch.matching import Targets
    from networks import get_network
    from reparam_module import ReparamModule
    model, channel, classes, im_size = MEMPLAN_CASES[case]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(classes * ipc, channel, *im_size, generator=gen).to(dev).requires_grad_(True)
    labels = torch.arange(classes).repeat_interleave(ipc).to(dev)
    syn_lr = torch.tensor(0.01, device=dev, requires_grad=True)
    net = get_network(model, channel, classes, im_size)
    student = ReparamModule((stock_layers(net) if stock else net).to(dev))
    w0 = student.flat_param()
    targets = Targets(w0, w0 + 0.01 * torch.randn(w0.shape, generator=gen).to(dev))
    return student, images, labels, syn_lr, w0, targets, gen


def _vm_hwm_mib() -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


def memplan_child(case: str, unroll: str, syn_steps: int, ipc: int, device: str) -> dict:
    """Peak growth of one distill iteration (unroll, matching backward, SGD steps) in this fresh process,
    over the memory once a two-step iteration has warmed the runtime up (code pages, thread pools and
    the optimisers' momentum are not the iteration's). CPU: VmHWM reset through /proc/self/clear_refs;
    the parent runs this with glibc's mmap threshold fixed, so freed tensors leave the RSS, as they
    leave CUDA's max_memory_allocated."""
    from trajmatch.matching import Unroll, match_and_backward
    dev = torch.device(device)
    student, images, labels, syn_lr, w0, targets, gen = random_cell(case, ipc, dev)
    opts = [torch.optim.SGD([images], lr=1.0, momentum=0.5), torch.optim.SGD([syn_lr], lr=1e-5, momentum=0.5)]

    def iteration(steps: int):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        match_and_backward(student, images, labels, syn_lr, w0, targets, Unroll(syn_steps=steps, batch_syn=images.shape[0], mode=unroll), generator=gen)
        for opt in opts:
            opt.step()

    iteration(2)  # every code path of both modes (recompute regenerates a segment from 2 steps on)
    gc.collect()
    if dev.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # VmHWM := current RSS
        base = current_rss_mib()
    start = time.perf_counter()
    iteration(syn_steps)
    if dev.type == 'cuda':
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _vm_hwm_mib() - base
    return {'case': case, 'unroll': unroll, 'syn_steps': syn_steps, 'ipc': ipc, 'measured_mib': peak,
            'sec': time.perf_counter() - start, 'device': device}


def bench_memplan(device: str) -> list[dict]:
    """Predicted (memplan.py) vs measured peak growth of one iteration, one fresh process per cell, one
    cell at a time; a cell whose predicted growth would not fit the free RAM comfortably is skipped."""
    from trajmatch.memplan import MiB, RunShape, free_bytes, make_plan
    # freed tensors go back to the OS at once; one thread: on a shared CPU, OpenMP's spinning threads made a
    # cell 15x slower (same peak), and only memory is measured here
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': '65536', 'OMP_NUM_THREADS': '1'}
    rows = []
    for case, (model, channel, classes, im_size) in MEMPLAN_CASES.items():
        for ipc in IPCS:
            for unroll in UNROLL_MODES:
                for steps in SYN_STEPS:
                    shape = RunShape(model, channel, classes, im_size, ipc, classes * ipc, steps)
                    row = {'case': case, 'ipc': ipc, 'unroll': unroll, 'syn_steps': steps,
                           'predicted_mib': make_plan(shape).growth(unroll) / MiB}
                    free = free_bytes(torch.device('cpu')) if device == 'cpu' else None
                    if free is not None and row['predicted_mib'] * MiB > MEMPLAN_RAM_SHARE * free:
                        row['skipped'] = f"predicted {row['predicted_mib']:.0f} MiB > {MEMPLAN_RAM_SHARE:.0%} of " \
                                         f"{free / MiB:.0f} MiB free"
                    else:
                        row.update(run_child('memplan', case, unroll, steps, ipc, device, env=env))
                        row['error'] = row['predicted_mib'] / row['measured_mib'] - 1
                    rows.append(row)
                    print(memplan_line(row), flush=True)
    done = [r for r in rows if 'error' in r]
    if done:
        print(f"memplan: {len(done)} cells measured, largest |predicted / measured - 1| = "
              f"{max(abs(r['error']) for r in done):.1%}; {len(rows) - len(done)} skipped")
    return rows


def memplan_line(r: dict) -> str:
    head = f"memplan {r['case']:>8} ipc {r['ipc']:>2} {r['unroll']:>9} syn_steps {r['syn_steps']:>2}: " \
           f"predicted +{r['predicted_mib']:.1f} MiB"
    if 'skipped' in r:
        return f"{head}, not run ({r['skipped']})"
    return f"{head}, measured +{r['measured_mib']:.1f} MiB ({r['error']:+.1%}; {r['sec']:.1f} s)"


def bench_expert(device: str) -> dict:
    from trajmatch.data import load_dataset
    from networks import get_network
    from trajmatch.training import OneNet, SGDSettings, train_epoch
    dev = torch.device(device)
    data = load_dataset('Digits')
    x, y = data.images_train.to(dev), data.labels_train.to(dev)
    torch.manual_seed(0)
    net = OneNet(get_network('ConvNetD2', data.channel, data.num_classes, data.im_size).to(dev))
    opt = net.sgd(SGDSettings(lr=0.01, momentum=0.0, weight_decay=0.0))
    gen = torch.Generator().manual_seed(0)
    sec = _median_time(lambda: train_epoch(net, x, y, opt, batch_size=256, generators=[gen]), 5)
    r = {'sec_per_expert_epoch': sec, 'images_per_epoch': len(y)}
    print(f"expert epoch (Digits, {len(y)} images, ConvNetD2): {r['sec_per_expert_epoch']:.3f} s", flush=True)
    return r


def bench_expert_stacked(device: str, k: int = EVAL_NETS) -> dict:
    """Would --parallel_experts pay? K experts' epochs trained together (stacked.py) vs one at a time."""
    from trajmatch.data import load_dataset
    from trajmatch.evaluation import fresh_network
    from trajmatch.training import SGDSettings, net_group, train_epoch
    dev = torch.device(device)
    data = load_dataset('Digits')
    x, y = data.images_train.to(dev), data.labels_train.to(dev)
    shape = (data.channel, data.num_classes, data.im_size)
    nets = [fresh_network('ConvNetD2', shape, s, dev) for s in range(k)]
    sgd = SGDSettings(lr=0.01, momentum=0.0, weight_decay=0.0)
    ones = [net_group([n]) for n in nets]
    opts = [g.sgd(sgd) for g in ones]
    gens = [torch.Generator().manual_seed(s) for s in range(k)]
    stack = net_group(nets)
    sopt = stack.sgd(sgd)

    def loop():
        for g, o, gen in zip(ones, opts, gens):
            train_epoch(g, x, y, o, batch_size=256, generators=[gen])

    def stacked():
        train_epoch(stack, x, y, sopt, batch_size=256, generators=gens)

    r = {'experts': k, 'sec_loop': _median_time(loop, 3), 'sec_stacked': _median_time(stacked, 3)}
    r['speedup'] = r['sec_loop'] / r['sec_stacked']
    print(f"{k} expert epochs: one at a time {r['sec_loop']:.3f} s, stacked {r['sec_stacked']:.3f} s "
          f"(speed-up {r['speedup']:.2f}x)", flush=True)
    return r


def bench_eval(device: str, epochs: int = 1000) -> list[dict]:
    """Seconds per evaluation network: EVAL_NETS networks one at a time vs stacked (evaluation.py)."""
    from trajmatch.data import load_dataset
    from trajmatch.evaluation import random_real, stack_groups, train_and_score
    dev = torch.device(device)
    data = load_dataset('Digits')
    shape = (data.channel, data.num_classes, data.im_size)
    test = (data.images_test.to(dev), data.labels_test.to(dev))
    seeds = list(range(EVAL_NETS))
    rows = []
    for ipc in IPCS:
        images, labels = random_real(data, ipc, torch.Generator().manual_seed(0))
        images, labels = images.to(dev), labels.to(dev)
        start = time.perf_counter()
        for s in seeds:
            train_and_score('ConvNetD2', shape, images, labels, *test, lr=0.01, epochs=epochs, seeds=[s])
        loop = (time.perf_counter() - start) / len(seeds)
        start = time.perf_counter()
        train_and_score('ConvNetD2', shape, images, labels, *test, lr=0.01, epochs=epochs, seeds=seeds)
        stacked = (time.perf_counter() - start) / len(seeds)
        auto = 'stack' if len(stack_groups(seeds, 'ConvNetD2', shape, len(labels), 256, dev, 'auto')) == 1 else 'loop'
        rows.append({'ipc': ipc, 'epochs': epochs, 'networks': len(seeds), 'sec_per_eval_network_loop': loop,
                     'sec_per_eval_network_stacked': stacked, 'speedup': loop / stacked, 'auto_picks': auto})
        print(f"evaluation network (ipc {ipc}, {epochs} epochs, ConvNetD2, {len(seeds)} networks): one at a time "
              f"{loop:.2f} s, stacked {stacked:.2f} s per network (speed-up {loop / stacked:.2f}x; auto picks {auto})",
              flush=True)
    return rows


def bench_cross(device: str, ipc: int = 10, epochs: int = 300, test_images: int = 15_000) -> list[dict]:
    """Minutes per cross-architecture network of the Fashion-MNIST study (fmnist_study.CROSS_MODELS): an
    ipc-10 set of 1x28x28 images trained E+1 epochs (one step each at batch 256), then `test_images` test
    and validation images. Timed on short runs of the real evaluation path (evaluation.evaluate_set),
    projected: seconds per epoch from 10 vs 5 epochs, per 1,000 test images from 2,000 vs 1,000."""
    from trajmatch.evaluation import evaluate_set
    from studies.fmnist import CROSS_MODELS
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(10 * ipc, 1, 28, 28, generator=gen).to(dev)
    labels = torch.arange(10).repeat_interleave(ipc).to(dev)
    test = torch.randn(2000, 1, 28, 28, generator=gen).to(dev), torch.randint(0, 10, (2000,), generator=gen).to(dev)
    rows = []
    for model in CROSS_MODELS:
        def run(e, n):
            start = time.perf_counter()
            evaluate_set([model], (1, 10, (28, 28)), images, labels, test[0][:n], test[1][:n], lr=0.01, epochs=e,
                         num_eval=1, seed=0, progress=False)
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            return time.perf_counter() - start
        run(1, 1000)  # warm-up
        t5, t10, t5_2k = run(4, 1000), run(9, 1000), run(4, 2000)
        per_epoch, per_k = max(t10 - t5, 0.0) / 5, max(t5_2k - t5, 0.0)
        minutes = ((epochs + 1) * per_epoch + test_images / 1000 * per_k) / 60
        rows.append({'model': model, 'sec_per_epoch': per_epoch, 'sec_per_1000_test': per_k,
                     'min_per_network': minutes, 'epochs': epochs + 1, 'test_images': test_images})
        print(f"cross-architecture network ({model}, ipc {ipc}, 1x28x28): {per_epoch:.2f} s/epoch, {per_k:.2f} s "
              f"per 1,000 test images -> {minutes:.1f} min per network ({epochs + 1} epochs, {test_images:,} "
              f"images)", flush=True)
    total = sum(r['min_per_network'] for r in rows)
    print(f"cross-architecture table (2 sets x 3 seeds x 5 networks per model): {30 * total / 60:.1f} hours on "
          f"this device, one network at a time", flush=True)
    return rows


def bench_reparam(device: str, calls: int = 2000) -> dict:
    """Overhead of the functional student: ReparamModule(x, flat) minus the module's own call (batch 1)."""
    from networks import get_network
    from reparam_module import ReparamModule
    dev = torch.device(device)
    net = get_network('ConvNetD2', 1, 10, (8, 8)).to(dev)
    student = ReparamModule(net)
    x, flat = torch.randn(1, 1, 8, 8, device=dev), student.flat_param().requires_grad_(True)
    per_call = {}
    for name, fn in (('module', lambda: net(x)), ('reparam', lambda: student(x, flat))):
        per_call[name] = _median_time(lambda: [fn() for _ in range(calls)], 3) / calls * 1e6
    r = {'us_module_call': per_call['module'], 'us_reparam_call': per_call['reparam'],
         'us_overhead': per_call['reparam'] - per_call['module']}
    print(f"ReparamModule call (batch 1): {r['us_reparam_call']:.0f} us, module {r['us_module_call']:.0f} us, "
          f"overhead {r['us_overhead']:.0f} us", flush=True)
    return r


# ---------------------------------------------------------------- one layer's second derivative (--only layers)

LAYER_BATCHES = (10, 100)  # the ConvNet-128 maps of a 32x32x3 unroll at ipc 1 and ipc 10


def layer_cells():
    """(name, ours, stock, input shape per image): trajmatch/layers.py's layers and the PyTorch layers
    they stand for."""
    from torch import nn
    from trajmatch import layers
    return [('instance norm', lambda: layers.InstanceNorm(128), lambda: nn.GroupNorm(128, 128), (128, 32, 32)),
            ('ReLU', layers.ReLU, nn.ReLU, (128, 32, 32)),
            ('2x2 average pooling', layers.AvgPool2, lambda: nn.AvgPool2d(2, 2), (128, 32, 32)),
            ('conv 3->128', lambda: layers.Conv2d(3, 128, 3, padding=1), lambda: nn.Conv2d(3, 128, 3, padding=1),
             (3, 32, 32)),
            ('conv 128->128', lambda: layers.Conv2d(128, 128, 3, padding=1), lambda: nn.Conv2d(128, 128, 3, padding=1),
             (128, 16, 16))]


def layers_child(batch: str, device: str, repeats: str = '10') -> list[dict]:
    """Milliseconds of one layer's forward + create_graph backward (the inner step) and of the backward of
    that backward (the matching loss's), ours against the stock layer, median of `repeats` after a warm-up.
    As inside the unroll, the layer's input and its output's gradient both carry gradients (they depend on
    the weights through the other layers), and the double backward returns all of them."""
    dev = torch.device(device)
    rows = []
    for name, ours, stock, shape in layer_cells():
        row = {'layer': name, 'input': [int(batch), *shape], 'device': device}
        for kind, make in (('stock', stock), ('ours', ours)):
            torch.manual_seed(0)
            layer = make().to(dev)
            params = list(layer.parameters())
            x = torch.randn(int(batch), *shape, device=dev, requires_grad=True)
            gy = torch.randn(layer(x).shape, device=dev, requires_grad=True)
            taped = {}

            def first():
                grads = torch.autograd.grad(layer(x), [x, *params], gy, create_graph=True)
                taped['g'] = [g for g in grads if g.requires_grad]

            def second():
                torch.autograd.grad(taped['g'], [x, gy, *params], [torch.ones_like(t) for t in taped['g']],
                                    retain_graph=True, allow_unused=True)

            row[f'{kind}_first_ms'] = _median_time(first, int(repeats)) * 1e3
            row[f'{kind}_second_ms'] = _median_time(second, int(repeats)) * 1e3
        rows.append(row)
    return rows


def bench_layers(device: str, repeats: int = 10) -> list[dict]:
    """layers_child at each of LAYER_BATCHES, one fresh process each, one thread, malloc tuned."""
    rows = []
    for batch in LAYER_BATCHES:
        got = run_child('layers', batch, device, repeats, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        for row in got:
            print(f"layer {row['layer']:>20} {'x'.join(map(str, row['input'])):>14}: forward + backward "
                  f"{row['stock_first_ms']:7.2f} -> {row['ours_first_ms']:7.2f} ms, double backward "
                  f"{row['stock_second_ms']:7.2f} -> {row['ours_second_ms']:7.2f} ms (stock -> ours)", flush=True)
        rows += got
    return rows


def bench_loop(device: str, buffer_path: str, iters: int = 20) -> dict:
    """Seconds per distill.py iteration (ipc 10, syn_steps 20, Digits), everything in the loop included
    (expert loading, unroll, update, logging): the time of a run of 5 + iters iterations minus that of
    a run of 5, so setup and the final evaluation cancel out."""
    import tempfile
    import distill
    flags = ['--ipc', '10', '--syn_steps', '20', '--eval_it', '100000', '--num_eval', '1', '--epoch_eval_train', '1',
             '--wandb', 'disabled', '--buffer_path', buffer_path, '--device', device]
    walls = []
    with tempfile.TemporaryDirectory() as runs:
        for n in (5, 5 + iters):
            start = time.perf_counter()
            distill.main(flags + ['--Iteration', str(n), '--run_dir', runs])
            walls.append(time.perf_counter() - start)
    r = {'ipc': 10, 'syn_steps': 20, 'iterations': iters, 'sec_per_iter': (walls[1] - walls[0]) / iters}
    print(f"distill.py loop (Digits ipc 10, syn_steps 20, bptt): {r['sec_per_iter']:.3f} s/iteration", flush=True)
    return r


# ---------------------------------------------------------------- trajectories per iteration (--trajectories K)
#
# python -m tools.bench --only trajectories: trajectories matched per second with K students in one
# vectorised unroll (distill.py --trajectories K), K = 1, 2, 4, 8 at ipc 1 and 10, each cell in a fresh
# process (distill_child's cell: Digits, ConvNetD2, batch_syn = the whole set, syn_steps 20, bptt). K = 1
# is the plain unroll, what --trajectories 1 runs.

TRAJECTORIES = (1, 2, 4, 8)
TRAJECTORY_STEPS = 20  # the Digits quickstart's syn_steps


def trajectories_child(k: int, ipc: int, device: str, unroll: str = 'bptt') -> dict:
    """One cell in this (fresh) process: seconds per iteration of K students from K different starts,
    each with its own generator, and the peak memory as distill_child measures it."""
    from trajmatch.matching import Targets, Unroll, match_and_backward
    dev = torch.device(device)
    student, images, labels, syn_lr, gen = digits_cell(ipc, dev)
    w = student.flat_param()
    starts = [w + 0.01 * torch.randn(w.shape, generator=gen).to(dev) for _ in range(k)]
    finals = [s + 0.01 * torch.randn(w.shape, generator=gen).to(dev) for s in starts]
    gens = [torch.Generator().manual_seed(s) for s in range(k)]
    w0, targets = ((starts[0], Targets(starts[0], finals[0])) if k == 1 else
                   (torch.stack(starts), Targets(torch.stack(starts), torch.stack(finals))))
    u = Unroll(syn_steps=TRAJECTORY_STEPS, batch_syn=images.shape[0], mode=unroll)

    def step():
        images.grad = syn_lr.grad = None
        match_and_backward(student, images, labels, syn_lr, w0, targets, u, generator=gens[0] if k == 1 else gens)

    r = time_step(step, dev)
    return {'trajectories': k, 'ipc': ipc, 'unroll': unroll, 'syn_steps': TRAJECTORY_STEPS, **r,
            'trajectories_per_sec': k / r['sec_per_iter'], 'device': device}


def bench_trajectories(device: str) -> list[dict]:
    rows = []
    for ipc in IPCS:
        for k in TRAJECTORIES:
            rows.append(run_child('trajectories', k, ipc, device))
            r, one = rows[-1], rows[-1 - TRAJECTORIES.index(k)]
            print(f"trajectories ipc {ipc:>2} K {k}: {r['sec_per_iter']:.3f} s/it, {r['trajectories_per_sec']:.2f} "
                  f"trajectories/s (x{r['trajectories_per_sec'] / one['trajectories_per_sec']:.2f} of K = 1), peak "
                  f"+{r['peak_mib']:.1f} MiB", flush=True)
    return rows


# ---------------------------------------------------------------- against MTT's own iteration
#
# python -m tools.bench --only versus: our unroll against MTT's iteration, written here as its paper and
# code describe it (mtt_iteration), on the four cells of issue 27: ConvNet-128 on 32x32x3 and ConvNetW32 on
# 28x28x1, ipc 1 and 10, syn_steps 20, DSA, every image in every step, one thread, random data. Each
# implementation runs in its own fresh process (one at a time: an ipc-10 32x32x3 bptt child holds 8 GiB),
# VERSUS_ROUNDS rounds in alternating order, each a warm-up and VERSUS_ITERS timed iterations; the table
# gives the median over all timed iterations, the peak memory growth, system time and page faults, and
# ours / MTT. 'mtt' runs with glibc's malloc settings, as MTT's code runs; 'bptt_glibc' is our bptt with
# them too (TRAJMATCH_MALLOC=default: the allocator's share), 'mtt_tuned' MTT's loop with ours.
# For the ipc-10 cells a 'rate' child counts the FLOPs of one iteration and of one first-order training
# step of the same network (torch.utils.flop_counter) and times the latter: the unroll's FLOP rate over
# the first-order rate.

VERSUS_CELLS = (('32x32x3', 1), ('32x32x3', 10), ('28x28x1', 1), ('28x28x1', 10))
IMPLS = {'mtt': 'default', 'bptt': 'tuned', 'recompute': 'tuned', 'bptt_glibc': 'default', 'recompute_glibc': 'default',
         'mtt_tuned': 'tuned', 'recompute_sqrt': 'tuned', 'bptt_stock': 'tuned', 'recompute_stock': 'tuned'}
# recompute's state budget per implementation (--recompute_states_mib); recompute_sqrt: always checkpoints
# every ceil(sqrt(N)) steps, the schedule before the budget existed. *_stock: ours through PyTorch's stock
# conv/norm/ReLU/pooling (trajmatch.layers.stock_layers), the layers' share
STATES_MIB = {'recompute_sqrt': 0.0}
VERSUS_IMPLS = ('mtt', 'bptt', 'recompute')  # run by default; the others: --impls
VERSUS_STEPS = 20
VERSUS_ROUNDS, VERSUS_ITERS = 2, 3           # median of 6 timed iterations per implementation and cell
FIRST_ORDER_ITERS = 10


def mtt_iteration(model: str, shape: tuple, images, labels, syn_lr, start, target, *, syn_steps: int,
                  batch_syn: int, generator: torch.Generator, use_dsa: bool = True) -> torch.Tensor:
    """One iteration of MTT's distill.py loop, its way: a fresh functional student, a list of flat
    parameter tensors grown by one autograd.grad(create_graph=True) step at a time, batches popped from
    chunks of a fresh permutation, DSA drawn and applied in the step, the normalised distance, backward.
    Accumulates into images.grad and syn_lr.grad; returns the loss."""
    from networks import get_network
    from reparam_module import ReparamModule
    from trajmatch.augment import dsa
    from trajmatch.layers import stock_layers
    student = ReparamModule(stock_layers(get_network(model, *shape)).to(images.device))
    params = [start.clone().requires_grad_(True)]
    chunks = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(len(images), generator=generator).split(batch_syn))
        idx = chunks.pop()
        x = dsa(images[idx], generator=generator) if use_dsa else images[idx]
        loss = torch.nn.functional.cross_entropy(student(x, params[-1]), labels[idx])
        grad = torch.autograd.grad(loss, params[-1], create_graph=True)[0]
        params.append(params[-1] - syn_lr * grad)
    num = start.numel()
    dist = torch.nn.functional.mse_loss(params[-1], target, reduction='sum') / num
    dist_start = torch.nn.functional.mse_loss(start, target, reduction='sum') / num
    loss = dist / dist_start
    loss.backward()
    return loss.detach()


def versus_child(case: str, ipc: str, impl: str, device: str, iters: str) -> dict:
    """One implementation on one cell in this fresh process (malloc as the parent's environment says)."""
    from trajmatch.matching import RECOMPUTE_STATES_MIB, Unroll, match_and_backward
    dev = torch.device(device)
    student, images, labels, syn_lr, w0, targets, gen = random_cell(case, int(ipc), dev, stock=impl.endswith('_stock'))
    model, channel, classes, im_size = MEMPLAN_CASES[case]
    kind = impl.split('_')[0]

    def step():
        images.grad = syn_lr.grad = None
        if kind == 'mtt':
            mtt_iteration(model, (channel, classes, im_size), images, labels, syn_lr, targets.start, targets.final,
                          syn_steps=VERSUS_STEPS, batch_syn=images.shape[0], generator=gen)
        else:
            match_and_backward(student, images, labels, syn_lr, w0, targets,
                               Unroll(syn_steps=VERSUS_STEPS, batch_syn=images.shape[0], mode=kind,
                                      states_mib=STATES_MIB.get(impl, RECOMPUTE_STATES_MIB)), generator=gen)

    return {'case': case, 'ipc': int(ipc), 'impl': impl, **time_step(step, dev, int(iters)), 'device': device,
            'threads': torch.get_num_threads()}


def count_flops(fn) -> int:
    """FLOPs of fn() by torch.utils.flop_counter's registry (matmuls and convolutions, forward and backward,
    double backward included). Its FlopCounterMode cannot be used here: its module tracker's hooks refuse
    torch.autograd.grad, which the unroll calls every step."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            count = flop_registry.get(func._overloadpacket)
            if count is not None:
                Count.total += count(*args, **(kwargs or {}), out_val=out)
            return out

    with Count():
        fn()
    return Count.total


def rate_child(case: str, ipc: str, device: str) -> dict:
    """FLOPs of one bptt iteration and of one first-order training step (forward and backward of the same
    network on the same DSA-augmented batch, SGD step), and the first-order step's median seconds."""
    from networks import get_network
    from trajmatch.augment import dsa
    from trajmatch.matching import Unroll, match_and_backward
    dev = torch.device(device)
    student, images, labels, syn_lr, w0, targets, gen = random_cell(case, int(ipc), dev)
    model, channel, classes, im_size = MEMPLAN_CASES[case]
    unroll_flops = count_flops(lambda: match_and_backward(student, images, labels, syn_lr, w0, targets,
                                                          Unroll(syn_steps=VERSUS_STEPS, batch_syn=images.shape[0]),
                                                          generator=gen))
    net = get_network(model, channel, classes, im_size).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = images.detach()

    def first_order():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(dsa(x, generator=gen)), labels).backward()
        opt.step()

    first_order_flops = count_flops(first_order)
    r = time_step(first_order, dev, FIRST_ORDER_ITERS)
    return {'case': case, 'ipc': int(ipc), 'unroll_flops': unroll_flops, 'first_order_flops': first_order_flops,
            'first_order_sec': r['sec_per_iter'], 'device': device, 'threads': torch.get_num_threads()}


def phases_child(case: str, ipc: str, impl: str, device: str) -> dict:
    """Where recompute's time goes: median seconds of one step of each of its phases (matching.py) on this
    cell, and how many of each an iteration runs: the forward (record_steps: N - 1 free steps and step N
    taped), the segments' regeneration (free steps again), the per-step re-taping (forward and create_graph
    backward, N - 1 steps) and the vector-Jacobian / Hessian-vector product of the backward walk (the segments at
    `impl`'s state budget: none to regenerate when every state is kept)."""
    from trajmatch.matching import RECOMPUTE_STATES_MIB, _free_step, checkpoint_every, inner_loss, plan_steps, state_pair_bytes
    dev = torch.device(device)
    student, images, labels, syn_lr, w0, targets, gen = random_cell(case, int(ipc), dev, stock=impl.endswith('_stock'))
    plan = plan_steps(images, images.shape[0], VERSUS_STEPS, gen, True)
    idx, aug = plan.batches[0], plan.augs[0]
    x, y = images.detach()[idx], labels[idx]

    def free():
        _free_step(student, w0, None, x, y, syn_lr.detach(), aug, syn_mom=0.0, loss_weight=1.0)

    def taped():
        w = w0.clone().requires_grad_(True)
        return w, torch.autograd.grad(inner_loss(student, w, images[idx], y, aug=aug), w, create_graph=True)[0]

    def taped_and_products():
        w, g = taped()
        torch.autograd.grad(g, [w, images], grad_outputs=torch.ones_like(g))

    sec = {name: time_step(fn, dev, 5)['sec_per_iter'] for name, fn in
           (('free_step', free), ('taped_step', taped), ('taped_and_products', taped_and_products))}
    sec['products'] = sec.pop('taped_and_products') - sec['taped_step']
    n, every = VERSUS_STEPS, checkpoint_every(VERSUS_STEPS, state_pair_bytes(w0),
                                                 STATES_MIB.get(impl, RECOMPUTE_STATES_MIB) * 2**20)
    # record runs N - 1 steps graph-free and tapes step N, which the walk then does not re-tape (Tape.last)
    counts = {'record': n, 'regenerate': sum(min(s + every, n) - s - 1 for s in range(0, n, every)), 'retape': n - 1,
              'products': n}
    per_phase = {'record': (n - 1) * sec['free_step'] + sec['taped_step'],
                 'regenerate': counts['regenerate'] * sec['free_step'],
                 'retape': counts['retape'] * sec['taped_step'], 'products': n * sec['products']}
    return {'case': case, 'ipc': int(ipc), 'impl': impl, 'every': every, 'step_sec': sec, 'steps': counts,
            'phase_sec': per_phase,
            'predicted_sec': sum(per_phase.values()), 'malloc': os.environ.get(OPT_OUT, 'tuned'), 'device': device}


def bench_versus(device: str, cells=VERSUS_CELLS, impls=VERSUS_IMPLS) -> list[dict]:
    rows = []
    one_thread = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    for case, ipc in cells:
        runs = {impl: [] for impl in impls}
        for r in range(VERSUS_ROUNDS):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                env = {**one_thread, OPT_OUT: 'default'} if IMPLS[impl] == 'default' else one_thread
                runs[impl].append(run_child('versus', case, ipc, impl, device, VERSUS_ITERS, env=env))
        model = MEMPLAN_CASES[case][0]
        for impl, got in runs.items():
            times = [t for g in got for t in g['times']]
            rows.append({'case': case, 'model': model, 'ipc': ipc, 'impl': impl, 'malloc': IMPLS[impl],
                         'sec_per_iter': statistics.median(times), 'times': times,
                         'peak_mib': max(g['peak_mib'] for g in got),
                         'sys_sec_per_iter': statistics.mean(g['sys_sec_per_iter'] for g in got),
                         'minor_faults_per_iter': statistics.mean(g['minor_faults_per_iter'] for g in got),
                         'device': device})
        cell = {r['impl']: r for r in rows[-len(impls):]}
        for r in cell.values():
            if 'mtt' in cell:
                r['vs_mtt_time'] = r['sec_per_iter'] / cell['mtt']['sec_per_iter']
                r['vs_mtt_peak'] = r['peak_mib'] / cell['mtt']['peak_mib']
            if 'bptt' in cell:
                r['vs_bptt_time'] = r['sec_per_iter'] / cell['bptt']['sec_per_iter']
            print(versus_line(r), flush=True)
        if ipc >= 10 and 'bptt' in cell:
            rate = run_child('rate', case, ipc, device, env=one_thread)
            unroll_rate = rate['unroll_flops'] / cell['bptt']['sec_per_iter']
            first_rate = rate['first_order_flops'] / rate['first_order_sec']
            cell['bptt'].update(rate=rate, unroll_gflops_per_sec=unroll_rate / 1e9,
                                first_order_gflops_per_sec=first_rate / 1e9, of_first_order_rate=unroll_rate / first_rate)
            print(f"{case} ipc {ipc}: bptt unroll {rate['unroll_flops'] / 1e9:.0f} GFLOP per iteration, "
                  f"{unroll_rate / 1e9:.1f} GFLOP/s = {unroll_rate / first_rate:.2f} of the first-order rate "
                  f"({first_rate / 1e9:.1f} GFLOP/s, {rate['first_order_flops'] / 1e9:.1f} GFLOP per step)", flush=True)
        for impl in [i for i in cell if i.startswith('recompute')] if ipc >= 10 else []:
            env = {**one_thread, OPT_OUT: 'default'} if IMPLS[impl] == 'default' else one_thread
            ph = run_child('phases', case, ipc, impl, device, env=env)
            cell[impl]['phases'] = ph
            print(f"{case} ipc {ipc} {impl} phases (s per iteration, from one step each): " +
                  ', '.join(f"{k} {v:.2f} ({ph['steps'][k]} steps)" for k, v in ph['phase_sec'].items()) +
                  f"; sum {ph['predicted_sec']:.2f} vs measured {cell[impl]['sec_per_iter']:.2f}", flush=True)
    return rows


def versus_line(r: dict) -> str:
    line = f"versus {r['model']:>10} {r['case']} ipc {r['ipc']:>2} {r['impl']:>10}: {r['sec_per_iter']:7.2f} s/it"
    if 'vs_mtt_time' in r:
        line += f" ({r['vs_mtt_time']:.2f}x MTT)"
    line += f", peak +{r['peak_mib']:.0f} MiB"
    if 'vs_mtt_peak' in r:
        line += f" ({r['vs_mtt_peak']:.2f}x)"
    line += f", sys {r['sys_sec_per_iter']:.2f} s/it, {r['minor_faults_per_iter'] / 1e3:.0f} k faults/it, malloc {r['malloc']}"
    if r['impl'] != 'bptt' and 'vs_bptt_time' in r:
        line += f"; {r['vs_bptt_time']:.2f}x bptt"
    return line


# ---------------------------------------------------------------- children: one cell per fresh process

def _distill(unroll, steps, ipc, device):
    return distill_child(unroll, int(steps), int(ipc), device)


def _memplan(case, unroll, steps, ipc, device):
    return memplan_child(case, unroll, int(steps), int(ipc), device)


def _trajectories(k, ipc, device):
    return trajectories_child(int(k), int(ipc), device)


# name: (function of the command line's strings, whether the child tunes malloc as the entry points do);
# memplan's children measure RSS with glibc's mmap threshold fixed instead (bench_memplan)
CHILDREN = {'distill': (_distill, True), 'memplan': (_memplan, False), 'trajectories': (_trajectories, True),
            'versus': (versus_child, True), 'rate': (rate_child, True), 'phases': (phases_child, True),
            'layers': (layers_child, True)}


def run_child(name: str, *args, env: dict | None = None) -> dict:
    """python -m tools.bench --child NAME ARGS... in a fresh process; its last line's JSON."""
    out = subprocess.run([sys.executable, '-m', 'tools.bench', '--child', name, *map(str, args)],
                         capture_output=True, text=True, check=True, env=env, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


PARTS = ['distill', 'loop', 'reparam', 'expert', 'eval', 'cross', 'trajectories', 'layers', 'versus', 'memplan']
LONG = ('versus', 'memplan')  # not run by default: half an hour and more on a 2-core CPU


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', nargs='+', default=[p for p in PARTS if p not in LONG], choices=PARTS,
                   help=f'default: all but {" and ".join(LONG)} (long)')
    p.add_argument('--buffer_path', default='buffers', help="experts for 'loop' (bash buffer.sh makes them)")
    p.add_argument('--device', default='auto')
    p.add_argument('--out', default=os.path.join('tools', 'bench.json'))
    p.add_argument('--impls', nargs='+', default=list(VERSUS_IMPLS), choices=list(IMPLS), help="'versus': what runs")
    p.add_argument('--cells', nargs='+', default=[f'{c}:{i}' for c, i in VERSUS_CELLS], help="'versus': CASE:IPC")
    p.add_argument('--child', nargs='+', help=argparse.SUPPRESS)  # NAME ARGS...: one cell in this fresh process
    args = p.parse_args(argv)
    if args.child:
        name, *child_args = args.child
        fn, tuned = CHILDREN[name]
        if tuned:
            tune_malloc()  # as the entry points do (TRAJMATCH_MALLOC=default in the environment: glibc's own)
        print(json.dumps(fn(*child_args)))
        return
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    result = {'device': torch.cuda.get_device_name() if device == 'cuda' else f'cpu ({torch.get_num_threads()} threads)',
              'torch': torch.__version__}
    if 'distill' in args.only:
        result['distill'] = bench_distill(device)
        for ipc in IPCS:
            for unroll in UNROLL_MODES:
                by = {r['syn_steps']: r for r in result['distill'] if r['ipc'] == ipc and r['unroll'] == unroll}
                print(f"ipc {ipc} {unroll}: peak(80)/peak(10) = {by[80]['peak_mib'] / by[10]['peak_mib']:.2f}")
            ratio = [r['sec_per_iter'] for r in result['distill'] if r['ipc'] == ipc and r['unroll'] == 'recompute']
            base = [r['sec_per_iter'] for r in result['distill'] if r['ipc'] == ipc and r['unroll'] == 'bptt']
            print(f"ipc {ipc}: time recompute/bptt = " + ', '.join(f'{a / b:.2f}' for a, b in zip(ratio, base)))
    if 'loop' in args.only:
        result['loop'] = bench_loop(device, args.buffer_path)
    if 'reparam' in args.only:
        result['reparam'] = bench_reparam(device)
    if 'expert' in args.only:
        result['expert'] = bench_expert(device)
        result['expert_stacked'] = bench_expert_stacked(device)
    if 'eval' in args.only:
        result['eval'] = bench_eval(device)
    if 'cross' in args.only:
        result['cross'] = bench_cross(device)
    if 'memplan' in args.only:
        result['memplan'] = bench_memplan(device)
    if 'trajectories' in args.only:
        result['trajectories'] = bench_trajectories(device)
    if 'layers' in args.only:
        result['layers'] = bench_layers(device)
    if 'versus' in args.only:
        cells = [(c.split(':')[0], int(c.split(':')[1])) for c in args.cells]
        result['versus'] = bench_versus(device, cells, tuple(args.impls))
    if os.path.exists(args.out):  # the parts not run keep their last results
        with open(args.out) as f:
            result = {**json.load(f), **result}
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
