"""python -m studies {smoothness,ablation,methods,all,perturb,fmnist} [--list | --cell DIGEST | --report] [flags]:
see studies/experiments.py (and studies/fmnist.py, studies/cells.py)."""
from studies.experiments import main

main()
