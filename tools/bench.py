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


def _median_time(fn, repeats: int) -> float:
    """Median wall time of fn over `repeats` calls, after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def distill_child(unroll: str, syn_steps: int, ipc: int, device: str) -> dict:
    """One configuration, in this (fresh) process."""
    from trajmatch.data import load_dataset
    from trajmatch.evaluation import random_real
    from trajmatch.matching import Targets, Unroll, match_and_backward
    from networks import get_network
    from reparam_module import ReparamModule
    dev = torch.device(device)
    torch.manual_seed(0)
    data = load_dataset('Digits')
    gen = torch.Generator().manual_seed(0)
    images, labels = random_real(data, ipc, gen)
    images, labels = images.to(dev).requires_grad_(True), labels.to(dev)
    syn_lr = torch.tensor(0.01, device=dev, requires_grad=True)
    student = ReparamModule(get_network('ConvNetD2', data.channel, data.num_classes, data.im_size).to(dev))
    w0 = student.flat_param()
    target = w0 + 0.01 * torch.randn(w0.shape, generator=gen).to(dev)  # matching cost does not depend on the values
    targets = Targets(w0, target)

    u = Unroll(syn_steps=syn_steps, batch_syn=images.shape[0], mode=unroll)

    def step():
        images.grad = syn_lr.grad = None
        match_and_backward(student, images, labels, syn_lr, w0, targets, u, generator=gen)

    return {'unroll': unroll, 'syn_steps': syn_steps, 'ipc': ipc, **time_step(step, dev), 'device': device}


def time_step(step, dev: torch.device) -> dict:
    """Median seconds of step() over TIMED_ITERS after a warm-up, the peak memory growth over it (CUDA:
    max_memory_allocated; CPU: peak RSS), and per iteration the system time and minor page faults (the
    allocator's cost: allocator.py) with the malloc settings in force."""
    def synced():
        step()
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)

    base = current_rss_mib()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    before = resource.getrusage(resource.RUSAGE_SELF)
    sec = _median_time(synced, TIMED_ITERS)
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak = (torch.cuda.max_memory_allocated(dev) - base_cuda) / 2**20 if dev.type == 'cuda' else peak_rss_mib() - base
    per_iter = TIMED_ITERS + 1  # the warm-up iteration is inside the rusage window
    return {'sec_per_iter': sec, 'peak_mib': peak, 'sys_sec_per_iter': (after.ru_stime - before.ru_stime) / per_iter,
            'minor_faults_per_iter': (after.ru_minflt - before.ru_minflt) / per_iter,
            'malloc': os.environ.get(OPT_OUT, 'tuned')}


def bench_distill(device: str) -> list[dict]:
    rows = []
    for ipc in IPCS:
        for unroll in UNROLL_MODES:
            for steps in SYN_STEPS:
                out = subprocess.run([sys.executable, '-m', 'tools.bench', '--child', unroll, str(steps), str(ipc), device],
                                     capture_output=True, text=True, check=True, cwd=REPO)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"distill ipc {ipc:>2} {unroll:>9} syn_steps {steps:>2}: {r['sec_per_iter']:.3f} s/it, "
                      f"peak +{r['peak_mib']:.1f} MiB, sys {r['sys_sec_per_iter']:.3f} s/it, "
                      f"{r['minor_faults_per_iter']:.0f} faults/it (malloc {r['malloc']})", flush=True)
    return rows


# memplan cells: (model, channels, image size, classes); random images (memory does not depend on the values)
MEMPLAN_CASES = {'Digits': ('ConvNetD2', 1, 10, (8, 8)), '32x32x3': ('ConvNet', 3, 10, (32, 32))}
MEMPLAN_RAM_SHARE = 0.4  # run a cell only if its predicted growth is below this share of the free RAM


def random_cell(case: str, ipc: int, dev: torch.device):
    """A MEMPLAN_CASES cell on random images (time and memory do not depend on the values): the student,
    images, labels, syn_lr, w0, targets and the generator, seeded 0."""
    from trajmatch.matching import Targets
    from networks import get_network
    from reparam_module import ReparamModule
    model, channel, classes, im_size = MEMPLAN_CASES[case]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(classes * ipc, channel, *im_size, generator=gen).to(dev).requires_grad_(True)
    labels = torch.arange(classes).repeat_interleave(ipc).to(dev)
    syn_lr = torch.tensor(0.01, device=dev, requires_grad=True)
    student = ReparamModule(get_network(model, channel, classes, im_size).to(dev))
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
                        out = subprocess.run([sys.executable, '-m', 'tools.bench', '--memplan_child', case, unroll, str(steps),
                                              str(ipc), device], capture_output=True, text=True, check=True, env=env, cwd=REPO)
                        row.update(json.loads(out.stdout.strip().splitlines()[-1]))
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


PARTS = ['distill', 'loop', 'reparam', 'expert', 'eval', 'cross', 'memplan']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', nargs='+', default=PARTS[:-1], choices=PARTS, help='default: all but memplan (long)')
    p.add_argument('--buffer_path', default='buffers', help="experts for 'loop' (bash buffer.sh makes them)")
    p.add_argument('--device', default='auto')
    p.add_argument('--out', default=os.path.join('tools', 'bench.json'))
    p.add_argument('--child', nargs=4, help=argparse.SUPPRESS)
    p.add_argument('--memplan_child', nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        tune_malloc()  # as the entry points do (TRAJMATCH_MALLOC=default in the environment: glibc's own)
        unroll, steps, ipc, device = args.child
        print(json.dumps(distill_child(unroll, int(steps), int(ipc), device)))
        return
    if args.memplan_child:
        case, unroll, steps, ipc, device = args.memplan_child
        print(json.dumps(memplan_child(case, unroll, int(steps), int(ipc), device)))
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
    if os.path.exists(args.out):  # the parts not run keep their last results
        with open(args.out) as f:
            result = {**json.load(f), **result}
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == '__main__':
    main()
