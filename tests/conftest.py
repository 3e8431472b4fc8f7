import os
import sys

# tests import the top-level modules the way the scripts do
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('WANDB_SILENT', 'true')


def tiny_buffers(tmp_path_factory, num_experts: int, model: str, *extra: str) -> str:
    """A few 3-epoch Digits experts of `model` in a fresh folder (module-scoped fixtures build on it)."""
    import buffer
    path = tmp_path_factory.mktemp('buffers')
    buffer.main(['--num_experts', str(num_experts), '--train_epochs', '3', '--model', model,
                 '--buffer_path', str(path), *extra])
    return str(path)
