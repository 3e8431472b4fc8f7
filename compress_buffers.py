"""Compress MTT expert buffers for MCT (docs/method.md, MCT): K waypoints + per-layer path fractions.

    python compress_buffers.py --dataset Digits --model ConvNetD2 [--zca] [--k 4]
    python compress_buffers.py --folder buffers/Digits_NO_ZCA/ConvNetD2
Writes {folder}/mct{k}/replay_buffer_{n}.pt; re-running skips files already compressed.
"""
import argparse

from data import DATASETS, DEFAULT_MODEL, SUBSETS
from mct import compress_buffer_folder
from networks import MODELS
from trajectory_io import buffer_dir
from utils import CliParser, UsageError, check_flags, cli_entry, integer


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
