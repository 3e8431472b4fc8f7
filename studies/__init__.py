"""Studies: tables and figures made from many runs, one idempotent command per cell (python -m studies fmnist;
python -m studies fmnist --list for a job runner)."""
