"""Regroup the raw Tiny ImageNet validation images by class.

The raw zip keeps all validation pictures loose in val/images/ with their
classes in val/val_annotations.txt; data.py expects val/images/<wnid>/*.JPEG
(the same one-folder-per-class layout as train/). Re-running is a no-op.

    python prep_tiny.py --data_path DIR     # DIR holds tiny-imagenet-200/
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')


class PrepError(Exception):
    """A one-line, user-facing problem with the Tiny ImageNet folder."""


# ============================================================================
# Regrouping
# ============================================================================

def _read_annotations(path: Path) -> list[tuple[str, str]]:
    """(filename, wnid) pairs from the tab-separated val_annotations.txt."""
    pairs = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip('\n').split('\t')
            name, wnid = (parts + ['', ''])[:2]
            # Names must be plain file/folder names: no path tricks out of val/images.
            if not name or not wnid or Path(name).name != name or Path(wnid).name != wnid:
                raise PrepError(f'{path} line {n} is malformed (expected "<file>\\t<wnid>\\t<4 bbox ints>"); '
                                f're-extract tiny-imagenet-200.zip')
            pairs.append((name, wnid))
    return pairs


def regroup_tiny_val(root) -> int:
    """Move val/images/*.JPEG into val/images/<wnid>/; returns the number of files moved.

    root is the tiny-imagenet-200 folder (a folder that contains it is accepted too).
    Everything is checked before the first file moves, so a failure leaves the tree as it was.
    """
    root = Path(root)
    if not (root / 'val').is_dir() and (root / 'tiny-imagenet-200').is_dir():
        root = root / 'tiny-imagenet-200'
    images, ann = root / 'val' / 'images', root / 'val' / 'val_annotations.txt'
    if not images.is_dir():
        raise PrepError(f'Tiny ImageNet validation folder not found: expected {images}; download and unzip '
                        f'tiny-imagenet-200.zip into DIR and pass --data_path DIR')
    loose = sorted(e.name for e in os.scandir(images) if e.is_file() and Path(e.name).suffix.lower() in _IMAGE_SUFFIXES)
    if not loose:
        return 0   # already regrouped
    if not ann.is_file():
        raise PrepError(f'{ann} not found but {images} holds {len(loose)} loose images; re-extract tiny-imagenet-200.zip')
    try:
        pairs = _read_annotations(ann)
    except (OSError, UnicodeDecodeError) as e:
        raise PrepError(f'cannot read {ann} ({type(e).__name__}: {e}); re-extract tiny-imagenet-200.zip') from e
    wnid_of = dict(pairs)
    unlisted = [n for n in loose if n not in wnid_of]
    if unlisted:
        raise PrepError(f'{len(unlisted)} images in {images} (e.g. {unlisted[0]}) are not listed in {ann}; '
                        f're-extract tiny-imagenet-200.zip')
    for name in loose:
        dst = images / wnid_of[name]
        dst.mkdir(exist_ok=True)
        os.replace(images / name, dst / name)
    return len(loose)


# ============================================================================
# CLI
# ============================================================================

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description='Regroup Tiny ImageNet val images into val/images/<wnid>/.')
    p.add_argument('--data_path', default='data', help='folder that holds tiny-imagenet-200/')
    args = p.parse_args(argv)
    try:
        moved = regroup_tiny_val(Path(args.data_path) / 'tiny-imagenet-200')
    except (PrepError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'moved {moved} validation images into val/images/<wnid>/' if moved else
          'validation images already grouped by class; nothing to do')
    return 0


if __name__ == '__main__':
    sys.exit(main())
