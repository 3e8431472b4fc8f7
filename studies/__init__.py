"""Studies: tables and figures made from many runs (python -m studies fmnist)."""
