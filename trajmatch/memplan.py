"""Memory plan of one distillation iteration, for --unroll bptt and recompute, before a run starts.

    python distill.py --dataset CIFAR10 --ipc 10 --syn_steps 30 --plan   # one run's plan; no data needed
    python presets.py plan                                               # docs/memory.md's table, every preset

Predicted peak = what an iteration holds anyway (synthetic set and its SGD momentum, the student's
parameters, the expert points, the test set on the device, the evaluation networks trained there between
iterations) + what the unroll adds on top:
- bptt keeps every step's graph: N x (bytes autograd saves in one inner step + the step's w_n);
- recompute keeps (w_n, b_n) every ceil(sqrt(N)) steps, one segment's states and one step's graph.
K students (--trajectories K) hold K times every part of the unroll (and K sets of expert points); the
synthetic set, its gradient, the test set and the evaluation networks are there once. Their step is
probed as it runs, vmapped (matching.stacked_inner_loss), at 2 and 3 students and extrapolated in K: vmap's
grouped convolutions keep some activations and weights in a second layout, so a stacked student saves
more than a student alone (a third more on the Digits and 32x32 ConvNets).
The bytes one inner step saves come from a probe: that step, for the run's model on the run's image
shape, under torch.autograd.graph.saved_tensors_hooks, counting each saved storage once. Which tensors
autograd saves is fixed by the derivative formulas, not by the kernels, so the probe runs on the CPU
and plans a GPU run too. Every saved tensor is affine in the batch, so the probe runs at batches 1
and 2 and extrapolates exactly to batch_syn (a full-size probe of an ImageNet step would itself need
gigabytes). The backward of a step materialises one gradient per activation of the step: about the
step's forward activations, the "backward working set" below. `python -m tools.bench --only memplan`
checks the predictions against measured peaks.
"""
import functools
import os
from dataclasses import dataclass, field, replace

import torch

from trajmatch.augment import DSA_STRATEGY, Draw, draw, draw_group, parse_strategy
from trajmatch.matching import RECOMPUTE_STATES_MIB, checkpoint_every, inner_loss

MiB, GiB = 2**20, 2**30
GPU_GB = (24, 40, 80)              # the cards of the README table; a "G GB" card is taken as G GiB
CUDA_RESERVE = 1 * GiB             # CUDA context, cuDNN/cuBLAS workspaces: outside torch's allocator, not predicted
# auto needs peak x (1 + margin) free. CUDA: the caching allocator's rounding and fragmentation; CPU: glibc's
# heap keeps freed blocks: RSS measured up to 32 % over the tensor bytes (README, Memory plan)
MARGIN = {'cuda': 0.25, 'cpu': 0.5}
PROBE_BATCHES = (1, 2)
# --trajectories K > 1: stacked steps of 2 and 3 students, every saved tensor affine in K from 2 on (a stack of
# one saves as much as one student alone: vmap's layout copies are views there)
PROBE_STUDENTS = (2, 3)
DRAW_BYTES_PER_IMAGE = 24  # a step's DSA draw: at most a 2x3 float32 affine matrix per image (augment.py)
EVAL_BATCH = 256            # evaluation.evaluate_set's batch


# ---------------------------------------------------------------- the run's shapes

@dataclass(frozen=True)
class RunShape:
    """Everything the memory of one iteration depends on."""
    model: str
    channel: int
    num_classes: int
    im_size: tuple[int, int]
    ipc: int
    batch_syn: int                     # student batch; clipped to the synthetic set's size
    syn_steps: int
    middle_steps: tuple[int, ...] = ()  # AST's intermediate terms: the steps they read
    auto_steps: bool = False           # ATT
    syn_mom: float = 0.0
    dsa: bool = True
    weight_perturb: bool = False
    num_test: int = 0                  # test images kept on the device for the evaluations
    eval_networks: int = 0             # evaluation networks trained together on the device between iterations
    trajectories: int = 1              # --trajectories K: students unrolled together, one per trajectory
    states_mib: float = RECOMPUTE_STATES_MIB  # recompute keeps every (w_n, b_n) up to this (checkpoint_every)

    @property
    def num_syn(self) -> int:
        return self.num_classes * self.ipc

    @property
    def batch(self) -> int:
        return min(self.batch_syn, self.num_syn)

    @property
    def image_bytes(self) -> int:
        return self.channel * self.im_size[0] * self.im_size[1] * 4


# ---------------------------------------------------------------- the probe

class SavedBytes:
    """Context manager: the bytes of the distinct storages autograd saves inside it (views and tensors
    sharing a storage count once), leaving out the storages of `exclude` (the step's inputs)."""

    def __init__(self, exclude=()):
        self._skip = {t.untyped_storage().data_ptr() for t in exclude}
        self._sizes = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._skip:
            self._sizes[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def dsa_generator(group: str | None) -> torch.Generator:
    """A generator whose first DSA draw is `group` (the first such seed), so each group is probed once."""
    if group is None:  # no DSA: nothing is drawn
        return torch.Generator().manual_seed(0)
    for seed in range(10_000):
        if draw_group(DSA_STRATEGY, torch.Generator().manual_seed(seed)) == group:
            return torch.Generator().manual_seed(seed)
    raise ValueError(f"no seed draws DSA group {group!r}")


def probe_step(student, channel: int, num_classes: int, im_size: tuple[int, int], batch: int, *,
               group: str | None, syn_mom: float, students: int = 0) -> tuple[int, int, int]:
    """Bytes autograd saves in one bptt inner step (matching.unroll's body), in three phases:
    (forward of the inner loss, its create-graph backward, the update w - α b). students >= 1: the step
    of that many stacked students ([students, P] weights, each its own batch), 0: one student alone."""
    gen = torch.Generator().manual_seed(0)
    w = student.flat_param()
    w = (w.repeat(students, 1) if students else w).requires_grad_(True)
    images = torch.randn(batch, channel, *im_size, generator=gen).requires_grad_(True)
    labels = torch.arange(batch) % num_classes
    alpha = torch.tensor(0.01, requires_grad=True)
    b_prev = torch.zeros_like(w) if syn_mom else None
    inputs = [w, images, alpha] + ([b_prev] if syn_mom else [])
    with SavedBytes(exclude=inputs) as saved:
        idx = torch.randperm(batch, generator=gen)  # a batch is an index into the synthetic set, as syn_batches
        aug = Draw(None) if group is None else draw(images.shape, generator=dsa_generator(group))
        if students:  # every student draws the same group: bptt's mean over groups is the mean per student
            idx = torch.stack([idx] + [torch.randperm(batch, generator=gen) for _ in range(students - 1)])
            aug = (aug,) * students
        loss = inner_loss(student, w, images[idx], labels[idx], aug=aug)
        forward = saved.nbytes
        g = torch.autograd.grad(loss, w, create_graph=True)[0]
        graph = saved.nbytes
        b = g if b_prev is None else syn_mom * b_prev + g
        _ = w - alpha * b  # saves b (the step's update); w_n itself is counted by the plan
    return forward, graph - forward, saved.nbytes - graph


@dataclass(frozen=True)
class StepProbe:
    """One inner step at batch_syn (bytes), of all the run's students. bptt holds N steps: the mean over
    DSA groups; recompute holds one: the largest group."""
    num_params: int
    saved_bptt: float         # forward + create-graph backward + update, mean over groups
    saved_recompute: float    # forward + create-graph backward, largest group
    forward: float            # the forward's activations, largest group
    groups: int


@functools.lru_cache(maxsize=None)
def _probe_batches(model: str, channel: int, num_classes: int, im_size: tuple[int, int], dsa: bool,
                   syn_mom: bool, students: int = 0) -> tuple[int, dict]:
    """{group: [(forward, backward, update) at each PROBE_BATCHES]}, and the parameter count (students:
    probe_step's)."""
    from networks import get_network
    from reparam_module import ReparamModule
    with torch.random.fork_rng(devices=[]):  # building the network draws its init: leave the caller's RNG alone
        torch.manual_seed(0)
        student = ReparamModule(get_network(model, channel, num_classes, im_size))
    groups = parse_strategy(DSA_STRATEGY) if dsa else [None]
    out = {g: [probe_step(student, channel, num_classes, im_size, b, group=g, syn_mom=0.9 if syn_mom else 0.0,
                          students=students) for b in PROBE_BATCHES] for g in groups}
    return student.num_params, out


def _at_batch(values: list[tuple[int, ...]], batch: int) -> tuple[float, ...]:
    """Affine in the batch: v(b) = v(1) + (v(2) - v(1)) (b - 1)."""
    (b1, v1), (b2, v2) = zip(PROBE_BATCHES, values)
    return tuple(x1 + (x2 - x1) * (batch - b1) / (b2 - b1) for x1, x2 in zip(v1, v2))


def _at_students(one: list[tuple], two: list[tuple], k: int) -> list[tuple[float, ...]]:
    """Affine in the students (K >= 2), at each probe batch: v(K) = v(2) + (v(3) - v(2)) (K - 2)."""
    (k1, k2), out = PROBE_STUDENTS, []
    for v1, v2 in zip(one, two):
        out.append(tuple(x1 + (x2 - x1) * (k - k1) / (k2 - k1) for x1, x2 in zip(v1, v2)))
    return out


def probe(shape: RunShape) -> StepProbe:
    """One inner step at the run's batch, for all its students (K > 1: the stacked step)."""
    key = (shape.model, shape.channel, shape.num_classes, tuple(shape.im_size), shape.dsa, bool(shape.syn_mom))
    if shape.trajectories == 1:
        num_params, per_group = _probe_batches(*key)
    else:
        (num_params, one), (_, two) = (_probe_batches(*key, students=s) for s in PROBE_STUDENTS)
        per_group = {g: _at_students(one[g], two[g], shape.trajectories) for g in one}
    steps = [_at_batch(v, shape.batch) for v in per_group.values()]
    return StepProbe(num_params=num_params, saved_bptt=sum(f + b + u for f, b, u in steps) / len(steps),
                     saved_recompute=max(f + b for f, b, _ in steps), forward=max(f for f, _, _ in steps),
                     groups=len(steps))


# ---------------------------------------------------------------- closed-form parts

def longest_segment(syn_steps: int, every: int) -> int:
    """Most states recompute regenerates at once: the states strictly inside one checkpoint segment."""
    last_start = (syn_steps - 1) // every * every
    return max(min(every, syn_steps) - 1, syn_steps - last_start - 1)


def recompute_every(shape: RunShape, num_params: int) -> int:
    """recompute's checkpoint spacing at this shape (1: every state kept), as record_steps chooses it."""
    return checkpoint_every(shape.syn_steps, 2 * shape.trajectories * num_params * 4, shape.states_mib * 2**20)


def recompute_vectors(shape: RunShape, num_params: int) -> dict[str, int]:
    """Parameter-sized vectors (per student) recompute holds at its peak (the double backward of one
    walk step)."""
    n, every = shape.syn_steps, recompute_every(shape, num_params)
    read = set(shape.middle_steps) | {n}  # the steps the loss reads: kept from the forward
    return {
        'checkpoints': 2 * (n // every),                        # (w_n, b_n) at every `every` steps
        'segment': 2 * longest_segment(n, every),               # (w_n, b_n) regenerated inside a segment
        # kept w_n off the checkpoints, ATT's running best, one loss gradient per term, and the walk's
        # λ, λ_b, v, g, H v and H v's accumulator (w_prev reaches g through the weights and through the
        # gradient formula: two contributions are summed) (+ b_n with momentum)
        'walk': (sum(1 for s in read if s % every) + (shape.auto_steps and n > 1) + len(read) + 6
                 + (shape.syn_mom != 0)),
    }


@dataclass(frozen=True)
class Part:
    name: str
    bptt: float
    recompute: float
    held: bool  # there between iterations too (not part of an iteration's growth)


@dataclass
class Plan:
    shape: RunShape
    step: StepProbe
    parts: list[Part] = field(default_factory=list)

    def peak(self, mode: str) -> float:
        return sum(getattr(p, mode) for p in self.parts)

    def growth(self, mode: str) -> float:
        """What one iteration adds over what is held between iterations (what bench.py measures)."""
        return sum(getattr(p, mode) for p in self.parts if not p.held)


def make_plan(shape: RunShape, step: StepProbe | None = None) -> Plan:
    step = step or probe(shape)
    n, vec, k = shape.syn_steps, step.num_params * 4, shape.trajectories
    syn = shape.num_syn * shape.image_bytes
    rec = recompute_vectors(shape, step.num_params)
    every = recompute_every(shape, step.num_params)
    points = 3 + len(shape.middle_steps) + shape.weight_perturb  # θ*_t, θ*_{t+M}, w_0, θ*_{t+i}, perturbed start
    loss_terms = 1 + len(shape.middle_steps)
    batches = n * shape.batch * 8
    draws = n * shape.batch * DRAW_BYTES_PER_IMAGE if shape.dsa else 0
    # the student's forward activations per image stand in for the evaluation network's (the same model
    # for the first --eval_mode); held between iterations by the caching allocator, so added, not overlapped
    eval_batch = min(EVAL_BATCH, shape.num_syn)
    alone = step if k == 1 else probe(replace(shape, trajectories=1))  # an evaluation network is one network
    evaluation = shape.eval_networks * (3 * vec + 2 * eval_batch * alone.forward / shape.batch)
    both = lambda name, b, held=False: Part(name, b, b, held)  # noqa: E731
    per = f' ({k} students)' if k > 1 else ''  # K students: each part of the unroll K times (side by side)
    parts = [
        both('synthetic set, its SGD momentum, labels', 2 * syn + shape.num_syn * 8, True),
        both(f'student + {points} expert points{per}: {1 + k * points} x {step.num_params:,} parameters',
             (1 + k * points) * vec, True),
        both(f'test set on the device ({shape.num_test:,} images)', shape.num_test * (shape.image_bytes + 8), True),
        Part(f'saved by autograd{per}: bptt {n} steps, recompute 1', n * step.saved_bptt, step.saved_recompute,
             False),  # the probe's step is all K students'
        Part(f'student states{per}: bptt w_1..w_{n}; recompute ' +
             (f'every (w, b) pair ({n}, within {shape.states_mib:g} MiB)' if every == 1 else
              f'{rec["checkpoints"] // 2} checkpoint (every {every}) + {rec["segment"] // 2} segment (w, b) pairs'),
             k * n * vec,
             k * (rec['checkpoints'] + rec['segment']) * vec, False),
        Part(f'adjoints, loss-term gradients, kept states{per}',
             k * (2 + loss_terms) * vec, k * rec['walk'] * vec, False),
        both('image gradient', 2 * syn),
        both(f"backward working set (about one step's forward activations){per}", step.forward),
        Part(f'index batches and DSA draws of the step plan{per}',
             k * (batches + draws), k * (batches + draws), False),
        both(f'evaluation between iterations: {shape.eval_networks} network(s) x (weights, gradients, momentum) '
             f'+ batch {eval_batch} activations and their gradients', evaluation, True),
    ]
    return Plan(shape, step, parts)


# ---------------------------------------------------------------- what fits where

def fits(need: float, free: float, margin: float) -> bool:
    return need * (1 + margin) <= free


def fits_gpu(peak: float, gb: int) -> bool:
    return fits(peak, gb * GiB - CUDA_RESERVE, MARGIN['cuda'])


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this run: CUDA's free device memory, or the host's MemAvailable (None if unknown)."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    if device.type == 'cpu':
        try:
            with open('/proc/meminfo') as f:
                for line in f:
                    if line.startswith('MemAvailable:'):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def expert_cache_bytes(files: list[str], cache_mib: float) -> int:
    """Host memory the expert cache fills (trajectory_io.ExpertCursor): the files, up to --expert_cache_mib."""
    return int(min(sum(os.path.getsize(f) for f in files), cache_mib * MiB))


def choose_unroll(plan: Plan, device: torch.device, free: int | None, host_extra: int = 0) -> dict:
    """auto: bptt when its predicted peak fits the free memory with the device's margin, else recompute.
    On a CPU the expert cache (host_extra) comes out of the same memory. Unknown free memory: bptt."""
    margin = MARGIN['cuda' if device.type == 'cuda' else 'cpu']
    extra = host_extra if device.type == 'cpu' else 0
    need = {m: plan.peak(m) + extra for m in ('bptt', 'recompute')}
    bptt_fits = free is None or fits(need['bptt'], free, margin)
    return {'requested': 'auto', 'unroll': 'bptt' if bptt_fits else 'recompute', 'bptt_fits': bptt_fits,
            'peak_bptt_mib': round(plan.peak('bptt') / MiB, 1),
            'peak_recompute_mib': round(plan.peak('recompute') / MiB, 1),
            'host_cache_mib': round(extra / MiB, 1), 'free_mib': None if free is None else round(free / MiB, 1),
            'margin': margin, 'device': str(device)}


def describe_choice(choice: dict) -> str:
    free = 'unknown free memory' if choice['free_mib'] is None else f"{fmt(choice['free_mib'] * MiB)} free"
    cache = f" + expert cache {fmt(choice['host_cache_mib'] * MiB)}" if choice['host_cache_mib'] else ''
    return (f"unroll auto -> {choice['unroll']}: predicted peak bptt {fmt(choice['peak_bptt_mib'] * MiB)}, "
            f"recompute {fmt(choice['peak_recompute_mib'] * MiB)}{cache}; {choice['device']} has {free} "
            f"(bptt needs its peak x {1 + choice['margin']:g})")


# ---------------------------------------------------------------- printing

def fmt(nbytes: float) -> str:
    return f'{nbytes / GiB:.2f} GiB' if nbytes >= GiB else f'{nbytes / MiB:.1f} MiB'


def gpu_verdict(peak: float) -> str:
    return ' / '.join('yes' if fits_gpu(peak, gb) else 'no' for gb in GPU_GB)


def describe(plan: Plan) -> str:
    """The plan as a table: each part for both modes, the peaks and the GPUs each fits."""
    s, p = plan.shape, plan.step
    lines = [
        f"memory plan of one iteration: {s.model} ({p.num_params:,} parameters) on {s.channel}x{s.im_size[0]}x"
        f"{s.im_size[1]} images, {s.num_classes} classes x ipc {s.ipc} = {s.num_syn} synthetic images, batch_syn "
        f"{s.batch}, syn_steps {s.syn_steps}, intermediate terms {len(s.middle_steps)}, "
        f"ATT {'on' if s.auto_steps else 'off'}, syn_mom {s.syn_mom:g}, DSA {'on' if s.dsa else 'off'}"
        + (f", {s.trajectories} trajectories per iteration" if s.trajectories > 1 else ''),
        f"probe: one inner step on the CPU at batches {PROBE_BATCHES[0]} and {PROBE_BATCHES[1]}"
        + (f" with {PROBE_STUDENTS[0]} and {PROBE_STUDENTS[1]} stacked students" if s.trajectories > 1 else '')
        + f"{f' for each of {p.groups} DSA groups' if p.groups > 1 else ''}, bytes autograd saves extrapolated to "
        f"batch {s.batch}: {fmt(p.saved_bptt)} per bptt step",
        '',
    ]
    width = max(len(part.name) for part in plan.parts) + 2
    row = lambda name, bptt, rec: f"{name:<{width}}{bptt:>18}{rec:>18}"  # noqa: E731
    lines.append(row('part', 'bptt', 'recompute'))
    lines += [row(part.name, fmt(part.bptt), fmt(part.recompute)) for part in plan.parts]
    lines.append(row('peak', fmt(plan.peak('bptt')), fmt(plan.peak('recompute'))))
    lines.append(row(f"fits a {' / '.join(map(str, GPU_GB))} GB GPU", gpu_verdict(plan.peak('bptt')),
                     gpu_verdict(plan.peak('recompute'))))
    lines.append(f"(a G GB GPU: G GiB less {CUDA_RESERVE // GiB} GiB for the CUDA context and workspaces, peak x "
                 f"{1 + MARGIN['cuda']:g}; the margin covers the caching allocator's rounding and fragmentation, "
                 f"not other processes on the GPU nor NCCL's buffers beyond the first collective)")
    return '\n'.join(lines)


def describe_run(plan: Plan, unroll: str, device: torch.device) -> str:
    """distill.py --plan: the plan, and what auto would pick on this machine now (or the mode given)."""
    if unroll != 'auto':  # a resumed run, or an explicit mode
        return describe(plan) + f'\nthis run uses --unroll {unroll}'
    choice = choose_unroll(plan, device, free_bytes(device))
    return (describe(plan) + '\n' + describe_choice(choice)
            + ' (a run decides again once its data and experts are loaded)')


def preset_table(shapes: dict[str, RunShape], whole_set: dict[str, RunShape]) -> str:
    """Markdown: each preset's predicted peak in both modes and the GPUs each fits; a preset run with a
    reduced batch_syn gets a second line (whole_set[name]) with the whole synthetic set under recompute."""
    head = ['preset', 'model', 'batch_syn', 'syn_steps', 'bptt peak', f'bptt fits {"/".join(map(str, GPU_GB))} GB',
            'recompute peak', f'recompute fits {"/".join(map(str, GPU_GB))} GB']
    rows = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
    for name, shape in shapes.items():
        variants = [(name, shape, True)] + ([(f'{name}, whole set', whole_set[name], False)] if name in whole_set else [])
        for label, s, with_bptt in variants:
            plan = make_plan(s)
            bptt = [fmt(plan.peak('bptt')), gpu_verdict(plan.peak('bptt'))] if with_bptt else ['', '']
            rows.append('| ' + ' | '.join([f'`{label}`' if with_bptt else label, s.model, str(s.batch),
                                           str(s.syn_steps), *bptt, fmt(plan.peak('recompute')),
                                           gpu_verdict(plan.peak('recompute'))]) + ' |')
    return '\n'.join(rows)
