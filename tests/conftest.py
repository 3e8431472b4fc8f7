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


def kill_at_unroll(monkeypatch, n: int):
    """Make distill.py's n-th unroll raise KeyboardInterrupt, as if the job were killed there; returns the
    real match_and_backward (to put back with monkeypatch.setattr before resuming)."""
    import distill
    from trajmatch import matching
    calls, real = {'n': 0}, matching.match_and_backward

    def dies(*args, **kwargs):
        calls['n'] += 1
        if calls['n'] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, 'match_and_backward', dies)
    return real
