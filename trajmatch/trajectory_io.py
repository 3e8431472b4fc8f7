"""Expert trajectories on disk, in the MTT buffer format.

Layout: {buffer_path}/{dataset}[/{subset}/{res}][_NO_ZCA]/{model}/replay_buffer_{n}.pt
Each .pt holds a list of trajectories; a trajectory is a list of E+1 snapshots (init, then after
each epoch); a snapshot is a list of CPU float32 tensors in model.parameters() order. buffer.py
writes one expert per file (file n = expert n, so names never race) plus replay_buffer_{n}.json
metadata; MTT's files with several experts each read the same way.

Readers of experts see one interface, ExpertTrajectory, whichever kind the folder holds: MTT's files
(Trajectory, here) or MCT's compressed ones (mct.CompressedTrajectory); trajectory_kind(compressed)
picks the kind, kind.load_file(path) reads a file. This module imports mct, never the reverse.
"""
import glob
import hashlib
import io
import json
import numbers
import os
import re
from typing import ClassVar, Protocol, runtime_checkable

import torch

from trajmatch.mct import CompressedTrajectory, load_compressed
from trajmatch.cli import UsageError
from trajmatch.files import atomic_write_bytes, atomic_write_json, sha256_file, torch_bytes


# ---------------------------------------------------------------- the interface of both kinds

@runtime_checkable
class ExpertTrajectory(Protocol):
    """One expert trajectory, whichever kind the files hold: MTT's snapshots (Trajectory, below) or MCT's
    convexified path (mct.CompressedTrajectory). distill.py and ExpertCursor ask only this.

    at(s): θ*(s) [P] float32; integer s is a stored snapshot, real s only where continuous_time.
    continuous_time: start epochs are drawn real-valued (MCT) rather than as integers (MTT).
    param_numels: numel of each parameter tensor in model.parameters() order (they sum to P).
    nbytes: memory of the loaded tensors (ExpertCursor's cache budget).
    The kind's files: load_file(path) -> every trajectory of one file; epochs_on_disk checks a file
    against the model without keeping it and returns the epochs of its shortest trajectory.
    """
    continuous_time: ClassVar[bool]

    @property
    def num_epochs(self) -> int: ...

    @property
    def param_numels(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...

    def at(self, s) -> torch.Tensor: ...

    @classmethod
    def load_file(cls, path: str) -> list['ExpertTrajectory']: ...

    @classmethod
    def epochs_on_disk(cls, path: str, meta: dict | None, *, model: str, param_shapes: list) -> int: ...


def trajectory_kind(compressed: bool) -> type[ExpertTrajectory]:
    """The one place a flag picks the kind: MCT's compressed files (compress_buffers.py) or MTT's."""
    return CompressedTrajectory if compressed else Trajectory


def expert_loader(compressed: bool):
    """path -> the file's trajectories, verified against its sidecar's digest as it is read (where one is
    recorded): what distill.py reads experts with (ExpertCursor, the K-Means features)."""
    if not compressed:
        return Trajectory.load_file  # verifies itself
    return lambda path: load_compressed(path, verified_source(path, compressed=True))


# ---------------------------------------------------------------- paths

def buffer_dir(buffer_path: str, dataset: str, model: str, *, zca: bool,
               subset: str = 'imagenette', res: int = 128) -> str:
    """MTT's folder naming: ImageNet subsets add /{subset}/{res}; no-ZCA runs add _NO_ZCA
    (not for Tiny/ImageNet, which MTT never whitens and names plainly)."""
    name = dataset
    if dataset == 'ImageNet':
        name = os.path.join(dataset, subset, str(res))
    if not zca and dataset not in ('Tiny', 'ImageNet'):
        name += '_NO_ZCA'
    return os.path.join(buffer_path, name, model)


def expert_path(folder: str, index: int) -> str:
    return os.path.join(folder, f'replay_buffer_{index}.pt')


def meta_path(folder: str, index: int) -> str:
    return os.path.join(folder, f'replay_buffer_{index}.json')


def expert_files(folder: str) -> list[str]:
    """replay_buffer_{n}.pt files sorted by n."""
    found = [(expert_index(path), path) for path in glob.glob(os.path.join(folder, 'replay_buffer_*.pt'))]
    return [p for n, p in sorted(f for f in found if f[0] is not None)]


# ---------------------------------------------------------------- write

def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    # .detach().cpu() of a CPU tensor is the same storage: clone, or every snapshot aliases the final weights.
    # contiguous: channels_last weights (accel.py) are stored in the usual NCHW layout
    return [p.detach().to('cpu', torch.float32, copy=True, memory_format=torch.contiguous_format)
            for p in model.parameters()]


def save_expert(folder: str, index: int, trajectory: list[list[torch.Tensor]], metadata: dict) -> None:
    """Atomic: .pt first, then .json; an expert counts as saved once its .pt exists.
    The sidecar also records the .pt's size, sha256 and parameter shapes: a reader verifies the bytes
    against the digest, and trusts the shapes only while the sidecar describes the file on disk."""
    data = torch_bytes([trajectory])
    atomic_write_bytes(data, expert_path(folder, index))
    write_meta(folder, index, trajectory, metadata, digest=hashlib.sha256(data).hexdigest())


def write_meta(folder: str, index: int, trajectory: list[list[torch.Tensor]], metadata: dict,
               digest: str | None = None) -> None:
    """The sidecar; digest: the sha256 of the .pt's bytes (None: read from the file on disk)."""
    path = expert_path(folder, index)
    meta = {**metadata, 'num_snapshots': len(trajectory), 'pt_bytes': os.path.getsize(path),
            DIGEST_KEY: digest or sha256_file(path), 'param_shapes': [list(t.shape) for t in trajectory[0]]}
    atomic_write_json(meta, meta_path(folder, index))


def expert_done(folder: str, index: int) -> bool:
    return os.path.exists(expert_path(folder, index))


# ---------------------------------------------------------------- content digests

DIGEST_KEY = 'pt_sha256'   # the sidecar's sha256 of its .pt (sidecars from before it have none: still valid)
_HEX64 = re.compile(r'[0-9a-f]{64}')


def recorded_digest(meta: dict | None, compressed: bool = False) -> str | None:
    """The sha256 a sidecar records for the .pt beside it, or None (no sidecar, an older one, a malformed
    field). An MCT folder's sidecar counts only if compress_buffers.py wrote it for the compressed file
    ('compressed'); an older one is the MTT sidecar's verbatim copy, whose digest is of the MTT file."""
    digest = meta.get(DIGEST_KEY) if isinstance(meta, dict) else None
    if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
        return None
    if compressed and not isinstance(meta.get('compressed'), dict):
        return None
    return digest


def _digest_mismatch(path: str, compressed: bool) -> UsageError:
    again = 'compress_buffers.py' if compressed else 'buffer.py'
    return UsageError(f"{path} does not match the sha256 its sidecar {os.path.basename(path)[:-3]}.json records: "
                      f"its bytes changed after it was written (overwritten, damaged or replaced); delete it and its "
                      f".json and re-run {again}")


def read_verified(path: str, digest: str, compressed: bool = False, keep: bool = True) -> bytes:
    """The file's bytes, verified against `digest` as they are read (one pass: what torch.load then parses
    is exactly what was hashed, so a file changed after the check before work is caught here too).
    keep=False: only the check (memory stays one chunk; returns b'')."""
    h, chunks = hashlib.sha256(), []
    try:
        with open(path, 'rb') as f:
            while block := f.read(1 << 20):
                h.update(block)
                if keep:
                    chunks.append(block)
    except OSError as e:
        raise UsageError(f"cannot read expert buffer {path} ({e.strerror or e}); fix its permissions or re-run "
                         f"buffer.py") from None
    if h.hexdigest() != digest:
        raise _digest_mismatch(path, compressed)
    return b''.join(chunks)


def check_digest(path: str, digest: str, compressed: bool = False) -> None:
    """The file's bytes hash to `digest` (read in chunks), else a UsageError naming the file and the fix."""
    read_verified(path, digest, compressed, keep=False)


def expert_index(path: str) -> int | None:
    """n of an expert file's path (replay_buffer_{n}.pt, expert_path's inverse), else None."""
    m = re.fullmatch(r'replay_buffer_(\d+)\.pt', os.path.basename(path))
    return int(m.group(1)) if m else None


def sidecar_beside(path: str) -> dict | None:
    """sidecar_of for an expert file's path (replay_buffer_{n}.pt), or None."""
    index = expert_index(path)
    return None if index is None else sidecar_of(os.path.dirname(path), index)


def verified_source(path: str, compressed: bool = False):
    """What torch.load should read for `path`: its verified bytes where the sidecar records a digest,
    else the path itself (MTT's own files, older sidecars: checked in full by validate_buffers)."""
    digest = recorded_digest(sidecar_beside(path), compressed)
    return io.BytesIO(read_verified(path, digest, compressed)) if digest else path


# ---------------------------------------------------------------- read

def _load(path: str, mmap: bool):
    """torch.load(weights_only=True); mmap reads only the pickled structure (tensor data stays on disk),
    and falls back to a plain read for files in torch's legacy (non-zip) format."""
    if mmap:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except Exception:
            pass  # legacy format, or unreadable: the plain read below says which
    return torch.load(path, map_location='cpu', weights_only=True)


def load_trajectories(path: str, mmap: bool = False, verify: bool = False) -> list[list[list[torch.Tensor]]]:
    """Every trajectory of an MTT file. verify: against the digest its sidecar records, as it is read (no mmap)."""
    source = verified_source(path) if verify else path
    try:
        data = _load(source, mmap and source is path)
    except Exception as e:  # truncated, foreign, or a pickle weights_only refuses (never loaded unsafely)
        raise UsageError(f"cannot read expert buffer {path} ({type(e).__name__}); delete it and re-run "
                         f"buffer.py") from None
    if not (isinstance(data, list) and data and all(
            isinstance(t, list) and t and all(isinstance(s, list) and s and all(torch.is_tensor(x) for x in s)
                                              for s in t) for t in data)):
        raise UsageError(f"{path} is not an MTT buffer (list of trajectories of lists of tensors); re-run buffer.py")
    return data


def trajectory_tensor(trajectory: list[list[torch.Tensor]]) -> torch.Tensor:
    """[E+1, P] float32: one flat parameter vector per snapshot."""
    return torch.stack([torch.cat([t.reshape(-1).float() for t in snap]) for snap in trajectory])


class Trajectory:
    """An MTT expert trajectory (ExpertTrajectory): the [E+1, P] snapshots tensor, held as given (no copy)."""
    continuous_time: ClassVar[bool] = False

    def __init__(self, snapshots: torch.Tensor, param_numels):
        self.snapshots, self.param_numels = snapshots, tuple(int(n) for n in param_numels)
        if snapshots.dim() != 2 or sum(self.param_numels) != snapshots.shape[1]:
            raise ValueError(f"snapshots must be [E+1, P] with P = sum of param_numels "
                             f"({sum(self.param_numels)}), got shape {tuple(snapshots.shape)}")

    @classmethod
    def from_snapshots(cls, trajectory: list[list[torch.Tensor]]) -> 'Trajectory':
        return cls(trajectory_tensor(trajectory), [t.numel() for t in trajectory[0]])

    @property
    def num_epochs(self) -> int:
        return self.snapshots.shape[0] - 1

    @property
    def nbytes(self) -> int:
        return self.snapshots.nbytes

    def at(self, s: int) -> torch.Tensor:
        """The snapshot after epoch s (0: the initialisation); MTT stores integer epochs only."""
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"an MTT trajectory holds snapshots at integer epochs only, got s={s!r}; "
                            f"real-valued epochs need MCT's compressed trajectories (--mct)")
        if not 0 <= s <= self.num_epochs:
            raise ValueError(f"epoch {s} is outside the trajectory [0, {self.num_epochs}]")
        return self.snapshots[s]

    @classmethod
    def load_file(cls, path: str) -> list['Trajectory']:
        """Every trajectory of an MTT file, verified against its sidecar's digest as it is read."""
        return [cls.from_snapshots(t) for t in load_trajectories(path, verify=True)]

    @classmethod
    def epochs_on_disk(cls, path: str, meta: dict | None, *, model: str, param_shapes: list) -> int:
        """Where the sidecar records a digest: the file's bytes are verified against it (read in chunks), and
        the sidecar's shapes and length are trusted where it describes the file (its byte size). Otherwise
        (MTT's own files, older sidecars) a full read: torch.load weights_only, the structure, every shape,
        and every number finite."""
        wanted = [tuple(s) for s in param_shapes]
        digest = recorded_digest(meta)
        if digest:
            check_digest(path, digest)
            shapes, n = meta.get('param_shapes'), meta.get('num_snapshots')
            if (isinstance(n, int) and not isinstance(n, bool) and n >= 2
                    and meta.get('pt_bytes') == os.path.getsize(path)
                    and isinstance(shapes, list) and all(isinstance(x, list) for x in shapes)):
                if [tuple(x) for x in shapes] != wanted:
                    raise UsageError(f"{path} does not fit model {model} (parameter shapes differ); "
                                     f"these buffers were made for another model or dataset")
                return n - 1
        trajs = load_trajectories(path, mmap=True)
        if any([tuple(x.shape) for x in snap] != wanted for traj in trajs for snap in traj):
            raise UsageError(f"{path} does not fit model {model} (parameter shapes differ); "
                             f"these buffers were made for another model or dataset")
        if min(len(t) for t in trajs) < 2:
            raise UsageError(f"{path} holds a trajectory of a single snapshot; delete it and re-run buffer.py")
        if not digest and not all(bool(torch.isfinite(x).all()) for traj in trajs for snap in traj for x in snap):
            raise UsageError(f"{path} holds NaN or infinite weights (damaged, or a diverged expert); delete it "
                             f"and re-run buffer.py")
        return min(len(t) for t in trajs) - 1


def read_meta(folder: str, index: int) -> dict | None:
    """The JSON sidecar of expert `index`, or None where it is missing, unreadable or not a JSON object."""
    try:
        with open(meta_path(folder, index)) as f:
            meta = json.load(f)
    except (OSError, ValueError):  # missing, unreadable, garbage (UnicodeDecodeError is a ValueError too)
        return None
    return meta if isinstance(meta, dict) else None


def sidecar_of(folder: str, index: int) -> dict | None:
    """The sidecar of expert `index` if it is one of ours for that file (dataset/model strings, its own
    index), else None (missing, garbage, a list, another file's)."""
    meta = read_meta(folder, index)
    if not (meta and isinstance(meta.get('dataset'), str) and isinstance(meta.get('model'), str)):
        return None
    if 'index' in meta and meta['index'] != index:
        return None
    return meta


def expert_epochs_on_disk(path: str, meta: dict | None, *, dataset: str, model: str,
                          param_shapes: list, zca: bool | None = None,
                          kind: type[ExpertTrajectory] = Trajectory) -> int:
    """Epochs of the shortest trajectory in the expert file `path`, after checking that it is readable and was
    made for this dataset/model (UsageError naming the file otherwise).

    The sidecar's dataset/model/zca are checked here (MCT folders hold a copy of the MTT sidecar); the file
    itself by its kind (kind.epochs_on_disk: MTT trusts a sidecar that describes the file on disk, MCT files
    are small and always read).
    """
    if meta is not None:
        if meta['dataset'] != dataset or meta['model'] != model:
            raise UsageError(f"{path} holds experts of {meta['dataset']}/{meta['model']}, not "
                             f"{dataset}/{model}; use matching --dataset/--model or another --buffer_path")
        if zca is not None and isinstance(meta.get('zca'), bool) and meta['zca'] != zca:
            raise UsageError(f"{path} holds experts trained {'with' if meta['zca'] else 'without'} --zca; "
                             f"move it to the matching buffer folder")
    if kind is not Trajectory and (digest := recorded_digest(meta, compressed=True)):
        check_digest(path, digest, compressed=True)  # MTT verifies inside (the digest decides what it trusts)
    return kind.epochs_on_disk(path, meta, model=model, param_shapes=param_shapes)


def validate_buffers(folder: str, *, dataset: str, model: str, param_shapes: list[torch.Size],
                     needed_epochs: int, compressed: bool = False, zca: bool | None = None,
                     max_experts: int | None = None) -> list[str]:
    """Check before distilling that buffers exist and that every expert file the run will read (the first
    max_experts) is readable, belongs to this dataset/model and is long enough.

    needed_epochs = max_start_epoch + expert_epochs: the last snapshot index we will read.
    Returns the expert files the run reads. compressed: MCT files (trajectory_kind).
    """
    files = expert_files(folder)[:max_experts]
    if not files:
        raise UsageError(f"no expert buffers in {folder}; run buffer.py with the same --dataset/--model/--zca "
                         f"first, or point --buffer_path at them")
    for path in files:
        index = int(re.search(r'(\d+)\.pt$', path).group(1))
        last = expert_epochs_on_disk(path, sidecar_of(folder, index), dataset=dataset,
                                     model=model, param_shapes=param_shapes, zca=zca,
                                     kind=trajectory_kind(compressed))
        if needed_epochs > last:
            raise UsageError(f"max_start_epoch + expert_epochs = {needed_epochs} is past the end of the expert "
                             f"trajectories in {path} ({last} epochs); lower --max_start_epoch or train experts "
                             f"longer")
    return files


class ExpertCursor:
    """Walks all experts in a shuffled order; resumable.

    loader(path) -> list of trajectories (ExpertTrajectory; default: MTT files).
    The order of files in each pass, and of trajectories within a file, is a pure function of
    (seed, pass, position), so the state is three integers.
    Loaded files stay in memory up to cache_mib (the profiler put re-reading one file per iteration
    at about 3 % of a Digits ipc-10 iteration); past the budget, files are read when visited.
    """

    def __init__(self, files: list[str], seed: int, loader=None, cache_mib: float = 2048,
                 shared: 'ExpertCursor | None' = None):
        self.files, self.seed = files, seed
        self.loader = loader or Trajectory.load_file
        self.epoch = self.file_pos = self.traj_pos = 0
        self.cache_bytes, self._kept, self._kept_bytes = cache_mib * 2**20, {}, 0
        self._last = (None, None)
        # another walk over the same files reads them through `shared`'s cache (--trajectories K: the K
        # students' cursors keep one copy of each file, within one --expert_cache_mib)
        self.shared = shared

    def _perm(self, n: int, *salt: int) -> list[int]:
        g = torch.Generator().manual_seed(hash((self.seed,) + salt) % 2**62)
        return torch.randperm(n, generator=g).tolist()

    def _load(self, file_index: int) -> list:
        if file_index in self._kept:
            return self._kept[file_index]
        if self._last[0] == file_index:  # a file of several trajectories is read once per visit
            return self._last[1]
        trajs = self.loader(self.files[file_index])
        self._last = (file_index, trajs)
        size = sum(t.nbytes for t in trajs)
        if self._kept_bytes + size <= self.cache_bytes:
            self._kept[file_index], self._kept_bytes = trajs, self._kept_bytes + size
        return trajs

    def _current(self):
        file_index = self._perm(len(self.files), self.epoch)[self.file_pos]
        trajs = (self.shared or self)._load(file_index)
        return trajs, self._perm(len(trajs), self.epoch, self.file_pos)

    def next(self) -> ExpertTrajectory:
        trajs, order = self._current()
        traj = trajs[order[self.traj_pos]]
        self.traj_pos += 1
        if self.traj_pos == len(trajs):
            self.traj_pos = 0
            self.file_pos += 1
            if self.file_pos == len(self.files):
                self.file_pos, self.epoch = 0, self.epoch + 1
        return traj

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'file_pos': self.file_pos, 'traj_pos': self.traj_pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.file_pos, self.traj_pos = state['epoch'], state['file_pos'], state['traj_pos']


def avg_var(trajectory: torch.Tensor) -> float:
    """AST's smoothness metric Avg_Var = mean_t ||θ_t - θ_{t+1}||² over a [E+1, P] trajectory."""
    return (trajectory[1:] - trajectory[:-1]).pow(2).sum(1).mean().item()
