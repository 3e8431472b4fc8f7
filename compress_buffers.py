"""Compress MTT expert buffers for MCT (docs/method.md, MCT): K waypoints + per-layer path fractions.

    python compress_buffers.py --dataset Digits --model ConvNetD2 [--zca] [--k 4]
    python compress_buffers.py --folder buffers/Digits_NO_ZCA/ConvNetD2
Writes {folder}/mct{k}/replay_buffer_{n}.pt; re-running skips files already compressed.
"""
import argparse
import os

from trajmatch.data import DATASETS, DEFAULT_MODEL, SUBSETS
from trajmatch.mct import compress, compressed_dir
from networks import MODELS
from trajmatch.trajectory_io import Trajectory, buffer_dir, expert_files, load_trajectories
from trajmatch.cli import CliParser, UsageError, check_flags, cli_entry, integer
from trajmatch.files import atomic_torch_save, atomic_write_bytes


def compress_buffer_folder(folder: str, k: int = 4, out_folder: str | None = None) -> dict:
    """Compress every replay_buffer_{n}.pt of an MTT folder into out_folder (default {folder}/mct{k}).

    Files already in out_folder are skipped (re-runs are cheap; writes are atomic, so an existing file
    is complete). JSON sidecars are copied so the dataset/model checks still work on the output.
    Sizes are bytes on disk, over all files (skipped ones included).
    """
    files = expert_files(folder)
    if not files:
        raise UsageError(f"no expert buffers (replay_buffer_*.pt) in {folder}; run buffer.py first "
                         f"or check --buffer_path/--dataset/--model/--zca")
    out_folder = out_folder or compressed_dir(folder, k)
    written = bytes_full = bytes_compressed = 0
    for path in files:
        name = os.path.basename(path)
        out = os.path.join(out_folder, name)
        if not os.path.exists(out):
            compressed = []
            for snapshots in load_trajectories(path):  # one [E+1, P] tensor at a time
                traj = Trajectory.from_snapshots(snapshots)
                compressed.append(compress(traj.snapshots, traj.param_numels, k).state_dict())
            atomic_torch_save(compressed, out)
            written += 1
        sidecar = path[:-len('.pt')] + '.json'
        out_sidecar = os.path.join(out_folder, os.path.basename(sidecar))
        if os.path.exists(sidecar) and not os.path.exists(out_sidecar):
            with open(sidecar, 'rb') as f:
                atomic_write_bytes(f.read(), out_sidecar)
        bytes_full += os.path.getsize(path)
        bytes_compressed += os.path.getsize(out)
    return {'files': len(files), 'written': written, 'skipped': len(files) - written, 'out_folder': out_folder,
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


@cli_entry
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    folder = args.folder or buffer_dir(args.buffer_path, args.dataset, args.model or DEFAULT_MODEL[args.dataset],
                                       zca=args.zca, subset=args.subset, res=args.res)
    check_flags(args, {'k': integer(2), 'res': integer(1)})  # k waypoints include epochs 0 and E
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
