"""Run folders and logging: numbered folders, args.json, metrics.jsonl, image grids, optional wandb.

The run folder is the source of truth; wandb only mirrors it (and is never read back).
"""
import io
import json
import os
import re

import torch
import torch.nn.functional as F

from trajmatch.cli import UsageError, WriteError
from trajmatch.files import atomic_torch_save, atomic_write_bytes, atomic_write_json, finite_or_none

WANDB_MODES = ('auto', 'online', 'offline', 'disabled')

# The files of a distill.py run folder, named here only.
ARGS_FILE = 'args.json'             # the run's flags (resume reads them back)
METRICS_FILE = 'metrics.jsonl'      # one JSON object per logged iteration
CHECKPOINT_FILE = 'checkpoint.pt'   # everything --resume needs
FINAL_FILE = 'final.json'           # written last: the run has finished
GRID_NAME = 'synthetic_images'      # <name>.png, the latest evaluated images
EVAL_FILE = 'eval.json'             # eval.py --run's scores of the final set (eval_best.json: --which best)
BEST_FILES = ('images_best.pt', 'labels_best.pt', 'lr_best.pt')  # the set at the best evaluation so far
FINAL_FILES = ('images_final.pt', 'labels_final.pt', 'lr_final.pt')  # the set after the last iteration


def run_file(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, name)


def _save_set(run_dir: str, tensors, names) -> None:
    for tensor, name in zip(tensors, names):
        atomic_torch_save(tensor.detach().cpu(), run_file(run_dir, name))


def save_best(run_dir: str, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor) -> None:
    """The set at the best evaluation so far (selected on the test set, or on --valid's split; eval.py --run
    --which best reads it)."""
    _save_set(run_dir, (images, labels, lr), BEST_FILES)


def save_final(run_dir: str, images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor) -> None:
    """The set after the last iteration (what eval.py --run scores by default). Each file is written atomically;
    a resumed run that crashed while writing them writes them again before final.json."""
    _save_set(run_dir, (images, labels, lr), FINAL_FILES)


# ---------------------------------------------------------------- run folders

def new_run_dir(root: str, name: str) -> str:
    """root/NNN-name with NNN one past the highest present; mkdir without exist_ok, so two runs never share one."""
    os.makedirs(root, exist_ok=True)
    while True:
        numbers = [int(m.group(1)) for d in os.listdir(root) if (m := re.match(r'(\d+)-', d))]
        path = os.path.join(root, f'{max(numbers, default=-1) + 1:03d}-{name}')
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue


def latest_run_dir(root: str, holding: str | None = None) -> str | None:
    """The highest-numbered run folder in root; with `holding`, the highest one that has that file
    (a run that crashed before its first checkpoint is then passed over)."""
    runs = sorted((int(m.group(1)), d) for d in (os.listdir(root) if os.path.isdir(root) else [])
                  if (m := re.match(r'(\d+)-', d)))
    for _, d in reversed(runs):
        if holding is None or os.path.isfile(os.path.join(root, d, holding)):
            return os.path.join(root, d)
    return None


# ---------------------------------------------------------------- wandb

def resolve_wandb_mode(flag: str) -> str:
    """auto: WANDB_MODE if set, else online when a wandb login exists, else offline."""
    if flag != 'auto':
        return flag
    env = os.environ.get('WANDB_MODE')
    if env:
        return 'disabled' if env in ('disabled', 'dryrun_disabled') else env
    netrc = os.path.expanduser('~/.netrc')
    logged_in = bool(os.environ.get('WANDB_API_KEY'))
    if not logged_in and os.path.exists(netrc):
        with open(netrc) as f:
            logged_in = 'api.wandb.ai' in f.read()
    return 'online' if logged_in else 'offline'


# ---------------------------------------------------------------- images

def image_grid_png(images: torch.Tensor, nrow: int, min_side: int = 32) -> bytes:
    """PNG bytes of a grid of [N,C,H,W] images in [0,1]; tiny images are upscaled (nearest) to be seen."""
    from torchvision.utils import make_grid
    from PIL import Image
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[-1] < min_side:
        images = F.interpolate(images, scale_factor=min_side // images.shape[-1], mode='nearest')
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


# ---------------------------------------------------------------- the log

class RunLog:
    """metrics.jsonl (one JSON object per line, always with 'it') mirrored to wandb when enabled."""

    def __init__(self, run_dir: str, config: dict, *, wandb_mode: str = 'auto', project: str = 'ast-distill',
                 wandb_id: str | None = None):
        self.run_dir = run_dir
        self.metrics_path = run_file(run_dir, METRICS_FILE)
        self.mode = resolve_wandb_mode(wandb_mode)
        self.wandb = None
        if self.mode != 'disabled':
            import wandb  # imported only when used: it is slow to import
            # finish_previous: a run left open by an earlier in-process call that raised (a notebook, a sweep
            # script) would otherwise be returned by wandb.init and this run logged into its folder
            self.wandb = wandb.init(project=project, dir=run_dir, config=config, mode=self.mode,
                                    name=os.path.basename(run_dir), id=wandb_id, resume='allow' if wandb_id else None,
                                    reinit='finish_previous')
        self.wandb_id = self.wandb.id if self.wandb else None

    def truncate_after(self, it: int) -> None:
        """On resume, drop lines written after the checkpoint so metrics.jsonl has each iteration once
        (and a line torn by a crash or a full disk, which is not JSON)."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            keep = [line for line in f if (row := _row(line)) is not None and row['it'] <= it]
        atomic_write_bytes(''.join(keep).encode(), self.metrics_path)

    def log(self, it: int, **metrics) -> None:
        row = {'it': it, **{k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}}
        try:
            with open(self.metrics_path, 'a') as f:  # strict JSON: a non-finite value is written as null
                f.write(json.dumps(finite_or_none(row), allow_nan=False) + '\n')
        except OSError as e:
            raise WriteError(f"cannot append to {self.metrics_path} ({e.strerror or e}); free disk space or fix "
                             f"permissions") from None
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != 'it'}, step=it)

    def histogram(self, name: str, values: list, it: int) -> None:
        """A histogram in wandb (metrics.jsonl already has the raw values per iteration)."""
        if self.wandb and values:
            import wandb
            self.wandb.log({name: wandb.Histogram(values)}, step=it)

    def save_grid(self, images: torch.Tensor, nrow: int, name: str, it: int) -> str:
        path = os.path.join(self.run_dir, f'{name}.png')
        atomic_write_bytes(image_grid_png(images, nrow), path)
        if self.wandb:
            import wandb
            self.wandb.log({name: wandb.Image(path)}, step=it)
        return path

    def finish(self) -> None:
        if self.wandb:
            self.wandb.finish()


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get('it'), int) else None


def save_args(run_dir: str, args: dict) -> None:
    atomic_write_json(args, run_file(run_dir, ARGS_FILE))


def load_args(run_dir: str) -> dict:
    """The run's args.json as a dict; a missing, garbage or non-object file is a UsageError naming it."""
    path = run_file(run_dir, ARGS_FILE)
    try:
        with open(path) as f:
            args = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path} not found; {run_dir} is not a distill.py run folder") from None
    except (OSError, ValueError) as e:  # unreadable, not JSON, not UTF-8
        raise UsageError(f"{path} cannot be read as JSON ({type(e).__name__}); it was edited or is corrupt "
                         f"(restore it, or start a new run)") from None
    if not isinstance(args, dict):
        raise UsageError(f"{path} holds a JSON {type(args).__name__}, not the run's flags; it was edited or is "
                         f"corrupt (restore it, or start a new run)")
    return args
