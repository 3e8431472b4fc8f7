"""python -m studies {smoothness,ablation,methods,perturb,fmnist,all} [flags]: see studies/experiments.py."""
from studies.experiments import main

main()
