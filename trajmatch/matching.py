"""Trajectory matching (docs/method.md, section 2): unroll a student on the synthetic set, compare with the expert.

The student is a ReparamModule: its weights are one flat vector w, so an inner step is
w_n = w_{n-1} - α b_n with b_n = μ b_{n-1} + g_n (μ = 0: plain SGD) and the matching loss reaches
the images S and α. Two ways to get that gradient, equal up to float rounding:
- bptt: keep every step's graph (memory grows with syn_steps x batch_syn);
- recompute: run the steps graph-free, keeping every (w_n, b_n) while they fit in --recompute_states_mib
  (else every ceil(sqrt(N)) steps) and what replays each step (its batch and augmentation); then walk
  backwards segment by segment, regenerating a segment's states (none when all are kept) and rebuilding
  one step's graph at a time to carry the adjoint (graph memory of one step; parameter vectors bounded
  by the budget or O(sqrt(N))).
Every random choice of an iteration (batches, augmentations) is drawn before the unroll (plan_steps) and
reaches the device in one copy; recompute replays steps from that plan.

K students at once (distill.py --trajectories K, the last section): w is [K, P], one row per student,
the plan is each student's own (one generator each), and one vmapped call steps all K; both unroll
modes run unchanged on it, and the loss is the mean of the K students' losses.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import vmap

from trajmatch.accel import fp32_unroll
from trajmatch.augment import Draw, apply_draw, draw, to_device
from trajmatch.stacked import stackable

UNROLLS = ('bptt', 'recompute')
ATT_METRICS = ('l1', 'l2')


# ---------------------------------------------------------------- the loss

@dataclass
class Targets:
    """Where the student should land: θ*_{t+M} at step N, and θ*_{t+i} at step n_i (AST)."""
    start: torch.Tensor                 # θ*_t: every term is normalised by the expert's own distance
    final: torch.Tensor                 # θ*_{t+M}
    middle: list[tuple[int, torch.Tensor, float]] = field(default_factory=list)  # (n_i, θ*_{t+i}, β_i)


def param_distance_ratio(w: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||w - target||² / ||start - target||²: 1 means no progress, 0 lands on the expert. K students
    (rows of [K, P]): each row's own ratio, a [K] tensor."""
    if w.dim() == 2:
        return (w - target).pow(2).sum(1) / (start - target).pow(2).sum(1)
    return (w - target).pow(2).sum() / (start - target).pow(2).sum()


def att_distance(w: torch.Tensor, target: torch.Tensor, metric: str = 'l1') -> torch.Tensor:
    """ATT's e_n = ||w_n - target|| (L1 as the authors' code, or L2), a 0-d tensor on w's device."""
    return torch.linalg.vector_norm(w.detach() - target, ord=1 if metric == 'l1' else 2)


def final_step(ws: list[torch.Tensor], target: torch.Tensor, auto_steps: bool, metric: str = 'l1') -> int:
    """N, or ATT's N_opt = argmin_{n >= 1} e_n, the first minimum (no gradient flows through the choice)."""
    if not auto_steps:
        return len(ws) - 1
    # one device-to-host copy for all N distances, not one per step
    dists = torch.stack([att_distance(w, target, metric) for w in ws[1:]]).tolist()
    return dists.index(min(dists)) + 1


def loss_terms(states: dict[int, torch.Tensor], targets: Targets, n_final: int) -> tuple[torch.Tensor, dict]:
    """L = ratio(w_{n_final}) + Σ β_i ratio_i(w_{n_i}); also returns each term for logging. K students
    ([K, P] states): L is the mean of their K losses, so its gradient is the mean of theirs; each term is
    logged as its mean over the students, and info['loss_students'] holds each student's own L."""
    loss = param_distance_ratio(states[n_final], targets.start, targets.final)
    info = {'loss_final': loss.detach()}
    for i, (n, theta, beta) in enumerate(targets.middle, start=1):
        term = param_distance_ratio(states[n], targets.start, theta)
        info[f'loss_mid{i}'] = term.detach()
        loss = loss + beta * term
    if loss.dim():  # K students
        info = {**{k: v.mean() for k, v in info.items()}, 'loss_students': loss.detach()}
        loss = loss.mean()
    return loss, info


# ---------------------------------------------------------------- one inner step, replayable

def syn_batches(num_syn: int, batch_syn: int, syn_steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for N steps: consecutive slices of fresh permutations of S, as MTT (CPU, drawn on the
    CPU generator)."""
    batches, order = [], torch.empty(0, dtype=torch.long)
    for _ in range(syn_steps):
        if len(order) == 0:
            order = torch.randperm(num_syn, generator=generator)
        batches.append(order[:batch_syn])
        order = order[batch_syn:]
    return batches


@dataclass
class StepPlan:
    """Every random choice of one unroll, made before it starts: step n's index batch and augmentation.
    Replaying step n (recompute) reads the same plan: nothing is drawn twice."""
    batches: list[torch.Tensor]
    augs: list[Draw]


def plan_steps(syn_images: torch.Tensor, batch_syn: int, syn_steps: int, generator: torch.Generator,
               use_dsa: bool) -> StepPlan:
    """The batches, then each step's DSA draw in step order (the order the generator always drew them
    in), moved to the images' device in one copy: on CUDA one non-blocking transfer per iteration.
    A list of K generators: K students' plans (stacked_plan)."""
    if isinstance(generator, (list, tuple)):
        return stacked_plan(syn_images, batch_syn, syn_steps, generator, use_dsa)
    batches = syn_batches(syn_images.shape[0], batch_syn, syn_steps, generator)
    per_image = tuple(syn_images.shape[1:])
    augs = [draw((len(idx), *per_image), generator=generator) if use_dsa else Draw(None) for idx in batches]
    augs, batches = to_device(augs, syn_images.device, batches)
    return StepPlan(batches, augs)


def inner_loss(student, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, aug: Draw,
               loss_weight: float = 1.0) -> torch.Tensor:
    if w.dim() == 2:  # K students, one row of w each
        return stacked_inner_loss(student, w, x, y, aug=aug, loss_weight=loss_weight)
    return F.cross_entropy(student(apply_draw(x, aug), w), y) * loss_weight


def heavy_ball(b: torch.Tensor | None, g: torch.Tensor, syn_mom: float) -> torch.Tensor:
    """b_n = μ b_{n-1} + g_n (b_1 = g_1; μ = 0: plain SGD, b_n = g_n)."""
    return g if (syn_mom == 0.0 or b is None) else syn_mom * b + g


def unroll(student, syn_images, syn_labels, syn_lr, w0, *, syn_steps: int, batch_syn: int,
           generator: torch.Generator, syn_mom: float = 0.0, use_dsa: bool = True,
           loss_weight: float = 1.0) -> list[torch.Tensor]:
    """Full back-propagation-through-time unroll (bptt); returns [w_0, ..., w_N], all in one graph."""
    plan = plan_steps(syn_images, batch_syn, syn_steps, generator, use_dsa)
    w = w0.detach().to(syn_images.device).requires_grad_(True)
    ws, b = [w], None
    for idx, aug in zip(plan.batches, plan.augs):
        loss = inner_loss(student, w, syn_images[idx], syn_labels[idx], aug=aug, loss_weight=loss_weight)
        g = torch.autograd.grad(loss, w, create_graph=True)[0]
        b = heavy_ball(b, g, syn_mom)
        w = w - syn_lr * b
        ws.append(w)
    return ws


# ---------------------------------------------------------------- the exact constant-memory backward

def _free_step(student, w, b, x, y, alpha, aug: Draw, *, syn_mom: float, loss_weight: float):
    """One inner step without a graph: (w_n, b_n) from (w_{n-1}, b_{n-1})."""
    w = w.detach().requires_grad_(True)
    loss = inner_loss(student, w, x, y, aug=aug, loss_weight=loss_weight)
    g = torch.autograd.grad(loss, w)[0]
    b = heavy_ball(b, g, syn_mom)
    return (w - alpha * b).detach(), b


# recompute keeps every step's (w_n, b_n) while they fit in this many MiB (--recompute_states_mib)
RECOMPUTE_STATES_MIB = 256.0


def checkpoint_every(syn_steps: int, pair_bytes: int, budget_bytes: float) -> int:
    """Steps between recompute's checkpoints. 1 (every state kept, nothing regenerated) while the N
    (w_n, b_n) pairs of pair_bytes fit in budget_bytes; otherwise ceil(sqrt(N)), which keeps O(sqrt(N))
    pairs and regenerates the states inside each segment graph-free. Either way memory is bounded in N."""
    if syn_steps * pair_bytes <= budget_bytes:
        return 1
    return max(1, math.ceil(math.sqrt(syn_steps)))


def state_pair_bytes(w0: torch.Tensor) -> int:
    """Bytes of one (w_n, b_n) pair of the unroll started at w0 (all K students' rows)."""
    return 2 * w0.numel() * w0.element_size()


def _taped_step(student, w_prev, images, idx, y, aug: Draw, *, loss_weight: float):
    """Step n's inner gradient g_n with its graph, at the leaf w_prev and the images leaf: what the backward
    walk differentiates (H_n v and dS from one vector-Jacobian product)."""
    loss = inner_loss(student, w_prev, images[idx], y, aug=aug, loss_weight=loss_weight)
    return torch.autograd.grad(loss, w_prev, create_graph=True)[0]


@dataclass
class Tape:
    """What the graph-free forward keeps: (w_n, b_n) every `every` steps, w_n at the steps the loss
    reads, and the plan that replays each step exactly (batch, augmentation). last: the final step N
    taped rather than run graph-free, (w_{N-1} leaf, g_N, images leaf), so the walk starts without
    re-taping it (not with ATT, whose N_opt is known only after step N)."""
    every: int
    checkpoints: dict[int, tuple[torch.Tensor, torch.Tensor | None]]
    kept: dict[int, torch.Tensor]
    plan: StepPlan
    n_final: int = 0
    last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def record_steps(student, syn_images, syn_labels, syn_lr, w0, *, syn_steps: int, batch_syn: int,
                 generator: torch.Generator, keep: set[int], target: torch.Tensor, auto_steps: bool,
                 att_metric: str, syn_mom: float = 0.0, use_dsa: bool = True, loss_weight: float = 1.0,
                 states_bytes: float = RECOMPUTE_STATES_MIB * 2**20) -> Tape:
    """Graph-free forward for --unroll recompute. Keeps every (w_n, b_n) if they fit in states_bytes,
    else checkpoints every ceil(sqrt(N)) steps (O(sqrt(N)) parameter vectors; checkpoint_every); ATT's
    N_opt is tracked on the fly (first minimum, as final_step). Without ATT the last step keeps its graph
    (Tape.last): the walk back starts there, so it is computed once, not twice; the one step's graph is
    what the walk holds anyway."""
    device = syn_images.device
    images, alpha = syn_images.detach(), syn_lr.detach()
    every = checkpoint_every(syn_steps, state_pair_bytes(w0), states_bytes)
    w, b = w0.detach().to(device), None
    plan = plan_steps(syn_images, batch_syn, syn_steps, generator, use_dsa)
    # an intermediate term can fall on step 0 (N < M): the start itself, a constant the loss still reads
    tape = Tape(every, {0: (w, None)}, {0: w} if 0 in keep else {}, plan)
    best_e = best_n = best_w = None  # ATT's running first minimum, kept on the device: no sync per step
    for n, (idx, aug) in enumerate(zip(plan.batches, plan.augs), start=1):
        if n == syn_steps and not auto_steps:
            w_prev, leaf = w.detach().requires_grad_(True), syn_images.detach().requires_grad_(True)
            g = _taped_step(student, w_prev, leaf, idx, syn_labels[idx], aug, loss_weight=loss_weight)
            b = heavy_ball(b, g.detach(), syn_mom)
            w = w_prev.detach() - alpha * b
            tape.last = (w_prev, g, leaf)
        else:
            w, b = _free_step(student, w, b, images[idx], syn_labels[idx], alpha, aug, syn_mom=syn_mom,
                              loss_weight=loss_weight)
        if n % every == 0:
            tape.checkpoints[n] = (w, b)
        if n in keep or n == syn_steps:
            tape.kept[n] = w
        if auto_steps:
            e = att_distance(w, target, att_metric)
            if n == 1:
                best_e, best_n, best_w = e, torch.tensor(1, device=device), w
            else:  # strictly smaller, as final_step's first minimum (a NaN never wins, as there)
                better = e < best_e
                best_e, best_n, best_w = (torch.where(better, e, best_e), torch.where(better, n, best_n),
                                          torch.where(better, w, best_w))
    tape.n_final = int(best_n) if auto_steps else syn_steps
    if auto_steps:
        tape.kept[tape.n_final] = best_w
    return tape


def recompute_backward(student, syn_images, syn_labels, syn_lr, tape: Tape, seeds: dict[int, torch.Tensor], *,
                       syn_mom: float, loss_weight: float) -> None:
    """Accumulate dL/dS into syn_images.grad and dL/dα into syn_lr.grad (docs/method.md, section 2).

    seeds[n] = ∂L/∂w_n from the loss terms. Walking n = max(seeds)..1 with adjoints λ (of w_n) and
    λ_b (of b_n, from the momentum recursion): v = λ_b - α λ is the adjoint of g_n, so
    dα += -b_n·λ, one vector-Jacobian product of g_n with v gives dS and H_n v, and
    λ_{n-1} = λ + H_n v (+ seed), λ_b,{n-1} = μ v. The walk goes segment by segment between
    checkpoints, regenerating each segment's states graph-free first; steps after the last loss term
    cost nothing; step N's graph comes from record_steps (Tape.last) when it taped it.
    """
    alpha = syn_lr.detach()
    batches, augs = tape.plan.batches, tape.plan.augs
    n_top = max(seeds)
    lam = seeds[n_top]
    lam_b = torch.zeros_like(lam)
    grad_s = torch.zeros_like(syn_images)
    grad_alpha = torch.zeros_like(alpha)
    last, tape.last = tape.last, None  # step N's graph, taped by record_steps: released once used
    images = last[2] if last is not None else syn_images.detach().requires_grad_(True)
    seg_end = n_top
    while seg_end > 0:
        seg_start = (seg_end - 1) // tape.every * tape.every
        w, b = tape.checkpoints[seg_start]
        ws, bs = {seg_start: w}, {seg_start: b}
        for n in range(seg_start + 1, seg_end):  # w_n for the segment; b_n too
            idx = batches[n - 1]
            w, b = _free_step(student, w, b, images.detach()[idx], syn_labels[idx], alpha, augs[n - 1],
                              syn_mom=syn_mom, loss_weight=loss_weight)
            ws[n], bs[n] = w, b
        for n in range(seg_end, seg_start, -1):
            idx = batches[n - 1]
            if last is not None and n == len(batches):
                (w_prev, g, _), last = last, None
            else:
                w_prev = ws[n - 1].detach().requires_grad_(True)
                g = _taped_step(student, w_prev, images, idx, syn_labels[idx], augs[n - 1], loss_weight=loss_weight)
            b_n = heavy_ball(bs[n - 1], g.detach(), syn_mom)
            grad_alpha -= (b_n * lam).sum()
            v = lam_b - alpha * lam
            if n == 1:  # the start's adjoint λ_0 is not needed: the images' part of the product only
                grad_s += torch.autograd.grad(g, images, grad_outputs=v)[0]
                break
            hv, gs = torch.autograd.grad(g, [w_prev, images], grad_outputs=v)
            grad_s += gs
            lam = lam + hv + seeds.get(n - 1, 0)
            lam_b = syn_mom * v
        seg_end = seg_start
    for param, grad in ((syn_images, grad_s), (syn_lr, grad_alpha)):
        param.grad = grad if param.grad is None else param.grad + grad


# ---------------------------------------------------------------- one matching step, either way

@dataclass(frozen=True)
class Unroll:
    """How the student is unrolled on the synthetic set (fixed for a run): N steps of batch_syn images,
    heavy-ball momentum, DSA, the gradient mode, and ATT's adaptive length."""
    syn_steps: int
    batch_syn: int
    syn_mom: float = 0.0
    use_dsa: bool = True
    mode: str = 'bptt'          # UNROLLS
    auto_steps: bool = False    # ATT: match at N_opt <= syn_steps
    att_metric: str = 'l1'
    states_mib: float = RECOMPUTE_STATES_MIB  # recompute: keep every state up to this (checkpoint_every)


def match_and_backward(student, syn_images, syn_labels, syn_lr, w0: torch.Tensor, targets: Targets, u: Unroll, *,
                       generator: torch.Generator, loss_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Unroll from w0 as `u` says, take the matching loss, and accumulate its gradient into syn_images.grad
    and syn_lr.grad. Returns (detached loss, info with the loss terms and the step the loss used).
    Always fp32: autocast is switched off here whatever the caller's context (accel.py).
    K students (--trajectories K): w0 [K, P], targets' tensors [K, P], one generator per student,
    loss_weight one number or a [K] tensor; the loss is their mean (loss_terms)."""
    if w0.dim() == 2:
        check_students(student, u)
    device = syn_images.device
    with fp32_unroll(device):
        targets = Targets(targets.start.to(device), targets.final.to(device),
                          [(n, t.to(device), beta) for n, t, beta in targets.middle])
        steps = dict(syn_steps=u.syn_steps, batch_syn=u.batch_syn, generator=generator, syn_mom=u.syn_mom,
                     use_dsa=u.use_dsa, loss_weight=loss_weight)
        middle_steps = {n for n, _, _ in targets.middle}
        if u.mode == 'bptt':
            ws = unroll(student, syn_images, syn_labels, syn_lr, w0, **steps)
            n_final = final_step(ws, targets.final, u.auto_steps, u.att_metric)
            loss, info = loss_terms({n: ws[n] for n in {n_final} | middle_steps}, targets, n_final)
            if torch.isfinite(loss):
                loss.backward()
        else:
            tape = record_steps(student, syn_images, syn_labels, syn_lr, w0, keep=middle_steps, target=targets.final,
                                auto_steps=u.auto_steps, att_metric=u.att_metric, states_bytes=u.states_mib * 2**20,
                                **steps)
            n_final = tape.n_final
            leaves = {n: tape.kept[n].detach().requires_grad_(True) for n in {n_final} | middle_steps}
            loss, info = loss_terms(leaves, targets, n_final)
            if torch.isfinite(loss):
                grads = torch.autograd.grad(loss, list(leaves.values()))
                recompute_backward(student, syn_images, syn_labels, syn_lr, tape, dict(zip(leaves, grads)),
                                   syn_mom=u.syn_mom, loss_weight=loss_weight)
        info['n_final'] = n_final
        return loss.detach(), info


# ---------------------------------------------------------------- K students at once (--trajectories K)
#
# K trajectories matched in one unroll: w is [K, P], row k student k's flat weights, and every step runs
# the K students as one vmapped call on their K batches. The loops above run unchanged on it (a step is
# w - α b on the whole [K, P]; their autograd calls and adjoints are [K, P] too): the K-student pieces
# are the plan (stacked_plan), the inner loss (stacked_inner_loss) and the loss's mean (loss_terms).
# Student k draws its batches and augmentations from its own generator, in the order one student alone
# draws them, so its unroll is the one a run (or a torchrun rank) with that generator makes.

def check_students(student, u: Unroll) -> None:
    """ValueError for what K stacked students cannot do: ATT chooses one N_opt per unroll (each student
    would need its own), and running statistics (BatchNorm) cannot be updated per student under vmap."""
    if u.auto_steps:
        raise ValueError("ATT (auto_steps) matches each trajectory at its own N_opt: not supported for K stacked "
                         "students; match one trajectory per unroll")
    if not stackable(student):
        raise ValueError("networks with buffers (BatchNorm running statistics) cannot be stacked as K students; "
                         "match one trajectory per unroll")


def stacked_plan(syn_images: torch.Tensor, batch_syn: int, syn_steps: int, generators: list[torch.Generator],
                 use_dsa: bool) -> StepPlan:
    """K students' plans, moved in one copy: step n's batch is [K, batch] (row k student k's indices), its
    augmentation a tuple of K draws. Student k draws from generators[k] exactly what plan_steps draws
    from it (the batches, then each step's DSA draw)."""
    per_image = tuple(syn_images.shape[1:])
    batches, augs = [], []
    for g in generators:
        mine = syn_batches(syn_images.shape[0], batch_syn, syn_steps, g)
        batches.append(mine)
        augs += [draw((len(idx), *per_image), generator=g) if use_dsa else Draw(None) for idx in mine]
    # the K students' batches of one step have one length: same set size, batch size and step count
    augs, steps = to_device(augs, syn_images.device, [torch.stack(step) for step in zip(*batches)])
    per_step = [tuple(augs[k * syn_steps + n] for k in range(len(generators))) for n in range(syn_steps)]
    return StepPlan(steps, per_step)


def stacked_inner_loss(student, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, aug: tuple[Draw, ...],
                       loss_weight=1.0) -> torch.Tensor:
    """Σ_k ν_k CE_k: student k (row k of w) on its own batch x[k], y[k] under its own draw aug[k]. A sum, so
    row k of its gradient is student k's own inner gradient. loss_weight: one number, or a [K] tensor on
    w's device (AST's ν of each student's start epoch)."""
    if any(d.op is not None for d in aug):
        x = torch.stack([apply_draw(xk, d) for xk, d in zip(x, aug)])
    out = vmap(student)(x, w)  # [K, batch, classes] in one call: the convolutions become grouped ones
    losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction='none').view(y.shape).mean(1)
    return (losses * loss_weight).sum()
