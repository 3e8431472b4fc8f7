"""MCT: expert trajectories compressed to a convexified path (docs/method.md, MCT).

An expert trajectory [E+1, P] is stored as K waypoints (evenly spaced epochs, including 0 and E)
plus, per epoch and per layer, the cumulative fraction of that layer's path length within its
segment. θ(s) for real s in [0, E] moves each layer along the straight line between the two
waypoints around s, at the speed the expert moved that layer: far fewer bytes than MTT (≈ K/(E+1))
and a continuous, convex-by-segment target to sample from.

On disk: {folder}/mct{k}/replay_buffer_{n}.pt, a list of CompressedTrajectory.state_dict() (plain
tensors, loadable with weights_only=True), next to a copy of the expert's JSON sidecar
(compress_buffers.py writes them). CompressedTrajectory answers trajectory_io.ExpertTrajectory, the
interface distill.py reads either kind through; this module imports nothing of trajectory_io.
"""
import math
import os
from bisect import bisect_right
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from trajmatch.cli import UsageError

KEYS = ('epochs', 'waypoints', 'fractions', 'layer_sizes')


# ---------------------------------------------------------------- waypoints

def waypoint_epochs(num_epochs: int, k: int = 4) -> list[int]:
    """K evenly spaced epochs in [0, E], both ends included, rounded half up.

    k is clipped to E+1; spacing E/(k-1) >= 1 then makes the rounded epochs strictly increasing.
    waypoint_epochs(50, 4) == [0, 17, 33, 50] (16.67 -> 17, 33.33 -> 33).
    """
    if num_epochs < 1:
        raise ValueError(f"a trajectory needs at least 1 epoch (2 snapshots), got E={num_epochs}")
    if k < 2:
        raise ValueError(f"k must be >= 2 (the waypoints include epochs 0 and E), got {k}")
    k = min(k, num_epochs + 1)
    # floor(x + 0.5), not round(): Python's round() is half-to-even, which would make the rule depend on parity.
    return [math.floor(i * num_epochs / (k - 1) + 0.5) for i in range(k)]


# ---------------------------------------------------------------- the compressed trajectory

@dataclass
class CompressedTrajectory:
    epochs: Tensor       # [K] int64 waypoint epochs, 0 ... E
    waypoints: Tensor    # [K, P] float32 parameters at those epochs
    fractions: Tensor    # [E+1, L] float32 cumulative path-length fraction per layer within its segment
    layer_sizes: Tensor  # [L] int64 numel of each parameter tensor, parameters() order
    continuous_time: ClassVar[bool] = True  # θ(s) is defined for real s: start epochs are drawn real-valued

    def __post_init__(self):
        # Checked here so from_state_dict on a foreign dict fails with a clear message, not deep in at().
        K, L = self.epochs.numel(), self.layer_sizes.numel()
        if self.epochs.dim() != 1 or K < 2:
            raise ValueError(f"epochs must be a 1-D tensor of >= 2 waypoints, got shape {tuple(self.epochs.shape)}")
        ep = self.epochs.tolist()
        if ep[0] != 0 or any(b <= a for a, b in zip(ep, ep[1:])):
            raise ValueError(f"waypoint epochs must start at 0 and strictly increase, got {ep}")
        P = int(self.layer_sizes.sum())
        if tuple(self.waypoints.shape) != (K, P):
            raise ValueError(f"waypoints shape {tuple(self.waypoints.shape)} != (K={K}, P={P})")
        if tuple(self.fractions.shape) != (ep[-1] + 1, L):
            raise ValueError(f"fractions shape {tuple(self.fractions.shape)} != (E+1={ep[-1] + 1}, L={L})")

    @property
    def num_epochs(self) -> int:
        return int(self.epochs[-1])

    @property
    def param_numels(self) -> tuple[int, ...]:
        return tuple(self.layer_sizes.tolist())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.state_dict().values())

    def segment(self, s: float) -> tuple[int, Tensor]:
        """(i, frac): s lies in segment [epochs[i], epochs[i+1]]; frac [L] is each layer's position along it.

        On an inner waypoint the segment starting there is chosen (frac 0: the waypoint itself, exactly).
        """
        s = float(s)
        E = self.num_epochs
        if not 0.0 <= s <= E:  # also rejects NaN
            raise ValueError(f"s={s} is outside the trajectory [0, {E}]")
        ep = self.epochs.tolist()
        i = min(bisect_right(ep, s) - 1, len(ep) - 2)  # s == E belongs to the last segment
        b = ep[i + 1]
        e0 = min(math.floor(s), b - 1)  # s == b only at E: interpolate up to t = 1 in the last step
        f0 = self.fractions[e0]
        # The row stored at b belongs to the next segment (0); within this one b is the end: 1.
        f1 = self.fractions[e0 + 1] if e0 + 1 < b else torch.ones_like(f0)
        # lerp returns its ends exactly at weight 0 and 1, so waypoints come back bit-for-bit.
        return i, torch.lerp(f0, f1, s - e0)

    def at(self, s: float) -> Tensor:
        """θ(s) [P] for real s in [0, E]: per layer, W_a + frac * (W_b - W_a)."""
        i, frac = self.segment(s)
        weight = frac.repeat_interleave(self.layer_sizes)  # per-layer fraction -> per-parameter weight
        return torch.lerp(self.waypoints[i], self.waypoints[i + 1], weight)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in KEYS}

    @classmethod
    def from_state_dict(cls, d: dict) -> 'CompressedTrajectory':
        if not isinstance(d, dict) or any(not isinstance(d.get(k), Tensor) for k in KEYS):
            raise ValueError(f"not a CompressedTrajectory state dict (needs tensors {', '.join(KEYS)})")
        return cls(epochs=d['epochs'].long(), waypoints=d['waypoints'].float(),
                   fractions=d['fractions'].float(), layer_sizes=d['layer_sizes'].long())

    @classmethod
    def load_file(cls, path: str) -> list['CompressedTrajectory']:
        return load_compressed(path)

    @classmethod
    def epochs_on_disk(cls, path: str, meta: dict | None, *, model: str, param_shapes: list) -> int:
        """Always a full read (the files are small): the sidecar is the MTT file's copy, not this file's."""
        trajs = load_compressed(path)
        if {t.param_numels for t in trajs} != {tuple(math.prod(s) for s in param_shapes)}:
            raise UsageError(f"{path} does not fit model {model} (layer sizes differ); "
                             f"these buffers were made for another model or dataset")
        return min(t.num_epochs for t in trajs)


# ---------------------------------------------------------------- compression

def step_norms(trajectory: Tensor, layer_sizes: list[int]) -> Tensor:
    """[E, L] float64: ||θ_{j+1,l} - θ_{j,l}||_2 per step j and layer l.

    One step at a time keeps memory O(P) for big models; float64 sums keep long layers accurate.
    """
    layer_id = torch.repeat_interleave(torch.arange(len(layer_sizes)), torch.tensor(layer_sizes))
    out = torch.zeros(trajectory.shape[0] - 1, len(layer_sizes), dtype=torch.float64)
    for j in range(trajectory.shape[0] - 1):
        sq = (trajectory[j + 1] - trajectory[j]).double().pow(2)
        out[j].index_add_(0, layer_id, sq)
    return out.sqrt()


def path_fractions(norms: Tensor, epochs: list[int]) -> Tensor:
    """[E+1, L] float32 cumulative path-length fraction per layer within each segment (docs/method.md, MCT).

    Row a of a segment [a, b] is 0; row b is left to the next segment (0), except row E which is 1.
    A layer that did not move in a segment gets the linear epoch fraction, so at() stays defined.
    """
    E, L = norms.shape
    frac = torch.zeros(E + 1, L, dtype=torch.float64)
    for a, b in zip(epochs, epochs[1:]):
        cum = torch.cat([torch.zeros(1, L, dtype=torch.float64), norms[a:b].cumsum(0)])  # [b-a+1, L]
        total = cum[-1]
        linear = torch.linspace(0, 1, b - a + 1, dtype=torch.float64)[:, None].expand_as(cum)
        moved = total > 0
        seg = torch.where(moved, cum / torch.where(moved, total, 1.0), linear)
        frac[a:b] = seg[:-1]
    frac[E] = 1.0
    return frac.float()


def compress(trajectory: Tensor, layer_sizes: list[int], k: int = 4) -> CompressedTrajectory:
    """Compress a [E+1, P] trajectory to k waypoints plus per-epoch, per-layer path fractions."""
    if trajectory.dim() != 2:
        raise ValueError(f"trajectory must be [E+1, P], got shape {tuple(trajectory.shape)}")
    layer_sizes = [int(n) for n in layer_sizes]
    if sum(layer_sizes) != trajectory.shape[1]:
        raise ValueError(f"layer sizes sum to {sum(layer_sizes)}, trajectory has P={trajectory.shape[1]}")
    trajectory = trajectory.float()
    epochs = waypoint_epochs(trajectory.shape[0] - 1, k)
    idx = torch.tensor(epochs, dtype=torch.long)
    # index_select copies: a view of the full trajectory would make torch.save write all E+1 rows.
    return CompressedTrajectory(
        epochs=idx,
        waypoints=trajectory.index_select(0, idx).contiguous(),
        fractions=path_fractions(step_norms(trajectory, layer_sizes), epochs),
        layer_sizes=torch.tensor(layer_sizes, dtype=torch.long))


# ---------------------------------------------------------------- files

def compressed_dir(folder: str, k: int = 4) -> str:
    return os.path.join(folder, f'mct{k}')


def load_compressed(path: str, source=None) -> list[CompressedTrajectory]:
    """source: what to read instead of the path (its bytes, already verified: trajectory_io.expert_loader)."""
    try:
        data = torch.load(path if source is None else source, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise UsageError(f"cannot read MCT buffer {path} ({type(e).__name__}); delete it and re-run "
                         f"compress_buffers.py") from None
    if not (isinstance(data, list) and data):
        raise UsageError(f"{path} is not an MCT buffer (list of compressed trajectories); re-run compress_buffers.py")
    try:
        return [CompressedTrajectory.from_state_dict(d) for d in data]
    except ValueError as e:
        raise UsageError(f"{path} is not a valid MCT buffer ({e}); re-run compress_buffers.py") from None
