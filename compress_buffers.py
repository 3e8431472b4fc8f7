"""Compress MTT expert buffers for MCT (docs/method.md, MCT): K waypoints + per-layer path fractions.

    python compress_buffers.py --dataset Digits --model ConvNetD2 [--zca] [--k 4]
    python compress_buffers.py --folder buffers/Digits_NO_ZCA/ConvNetD2
Writes {folder}/mct{k}/replay_buffer_{n}.pt; re-running skips files already compressed.
"""
import argparse
import hashlib
import os

import torch

from trajmatch.data import DATA_FLAG_DOMAINS, DATASETS, DEFAULT_MODEL, SUBSETS
from trajmatch.mct import compress, compressed_dir
from networks import MODELS
from trajmatch.trajectory_io import (DIGEST_KEY, Trajectory, buffer_dir, expert_files, expert_index,
                                     load_trajectories, meta_path, read_meta)
from trajmatch.cli import EPOCHS_MAX, CliParser, UsageError, check_flags, cli_entry, integer
from trajmatch.files import (atomic_write_bytes, atomic_write_json, check_writable, remove_stray_temps,
                             sha256_file, torch_bytes)


# compressed files kept in memory between the check of every input and the writes; past it a file is compressed
# again when written (the same bytes: compress is deterministic)
KEEP_BYTES = 1 << 30


def compress_file(path: str, k: int) -> list[dict]:
    """The MCT state dicts of every trajectory of one MTT file, read verified against its sidecar's digest
    (one [E+1, P] tensor at a time)."""
    compressed = []
    for snapshots in load_trajectories(path, verify=True):
        traj = Trajectory.from_snapshots(snapshots)
        compressed.append(compress(traj.snapshots, traj.param_numels, k).state_dict())
    return compressed


def write_sidecar(path: str, out: str, k: int, digest: str | None = None) -> None:
    """The MTT sidecar (the dataset/model checks use it) with the compressed file's size and sha256 (what
    readers verify it by; digest: of the bytes just written, else read from `out`) and 'compressed' (so a
    reader knows the digest is this file's). A sidecar that is not a JSON object is copied as it is
    (distill.py then reads the file in full)."""
    folder, index = os.path.dirname(path), expert_index(path)
    sidecar, out_sidecar = meta_path(folder, index), meta_path(os.path.dirname(out), index)
    if not os.path.exists(sidecar):
        return
    meta = read_meta(folder, index)
    if meta is None:
        with open(sidecar, 'rb') as f:
            atomic_write_bytes(f.read(), out_sidecar)
        return
    atomic_write_json({**meta, 'pt_bytes': os.path.getsize(out), DIGEST_KEY: digest or sha256_file(out),
                       'compressed': {'k': k, 'source_sha256': meta.get(DIGEST_KEY)}}, out_sidecar)


def compress_buffer_folder(folder: str, k: int = 4, out_folder: str | None = None) -> dict:
    """Compress every replay_buffer_{n}.pt of an MTT folder into out_folder (default {folder}/mct{k}).

    Every input is read (verified against its sidecar's digest) and compressed before anything is written:
    a corrupt later file is one UsageError with the output folder as it was. Files already in out_folder
    are skipped (re-runs are cheap; writes are atomic, so an existing file is complete). JSON sidecars go
    with them (write_sidecar). Sizes are bytes on disk, over all files (skipped ones included).
    """
    files = expert_files(folder)
    if not files:
        raise UsageError(f"no expert buffers (replay_buffer_*.pt) in {folder}; run buffer.py first "
                         f"or check --buffer_path/--dataset/--model/--zca")
    out_folder = out_folder or compressed_dir(folder, k)
    check_writable(out_folder, 'output folder')
    outs = {path: os.path.join(out_folder, os.path.basename(path)) for path in files}
    todo = [path for path in files if not os.path.exists(outs[path])]
    ready, kept = {}, 0
    for path in todo:  # check every input first
        compressed = compress_file(path, k)
        size = sum(t.nbytes for d in compressed for t in d.values() if torch.is_tensor(t))
        if kept + size <= KEEP_BYTES:
            ready[path], kept = compressed, kept + size
    remove_stray_temps(out_folder, shared=True)  # every input is good; study cells running at once may share it
    for path in files:
        if path in todo:
            data = torch_bytes(ready.pop(path, None) or compress_file(path, k))
            atomic_write_bytes(data, outs[path])
            write_sidecar(path, outs[path], k, digest=hashlib.sha256(data).hexdigest())
        elif not os.path.exists(meta_path(out_folder, expert_index(path))):
            write_sidecar(path, outs[path], k)
    bytes_full = sum(os.path.getsize(p) for p in files)
    bytes_compressed = sum(os.path.getsize(outs[p]) for p in files)
    return {'files': len(files), 'written': len(todo), 'skipped': len(files) - len(todo), 'out_folder': out_folder,
            'bytes_full': bytes_full, 'bytes_compressed': bytes_compressed,
            'ratio': bytes_compressed / bytes_full}


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Same flags and meaning as buffer.py, so the same command line finds the same folder.
    p.add_argument('--buffer_path', default='buffers')
    p.add_argument('--dataset', default='Digits', choices=DATASETS)
    p.add_argument('--model', default=None, choices=list(MODELS), help='default: the dataset\'s ConvNet')
    p.add_argument('--zca', action='store_true')
    p.add_argument('--subset', default='imagenette', choices=list(SUBSETS), help='ImageNet subset')
    p.add_argument('--res', type=int, default=128, help='ImageNet subset resolution (pixels)')
    p.add_argument('--folder', default=None, help='expert folder to compress (overrides the flags above)')
    p.add_argument('--out_folder', default=None, help='default: {folder}/mct{k}')
    p.add_argument('--k', type=int, default=4, help='waypoints per trajectory, including epochs 0 and E')
    return p


# flag -> allowed values; k waypoints include epochs 0 and E
FLAG_DOMAINS = {'k': integer(2, EPOCHS_MAX + 1), 'res': DATA_FLAG_DOMAINS['res']}


@cli_entry
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    folder = args.folder or buffer_dir(args.buffer_path, args.dataset, args.model or DEFAULT_MODEL[args.dataset],
                                       zca=args.zca, subset=args.subset, res=args.res)
    check_flags(args, FLAG_DOMAINS)
    try:
        stats = compress_buffer_folder(folder, k=args.k, out_folder=args.out_folder)
    except ValueError as e:
        raise UsageError(f"{folder}: {e}") from None
    mb = 1024 ** 2
    skipped = f" ({stats['skipped']} already compressed)" if stats['skipped'] else ''
    print(f"compressed {stats['files']} files: {stats['bytes_full'] / mb:.2f} MB -> "
          f"{stats['bytes_compressed'] / mb:.2f} MB (ratio {stats['ratio']:.4f}){skipped} in {stats['out_folder']}")
    return stats


if __name__ == '__main__':
    main()
