"""vitattn's benchmarks, one script per op (bench_<op>.py) plus bench_models.py; installed as
``vitattn.benchmarks`` so that ``python -m vitattn.bench`` runs from an installed package.
Each script also runs on its own: ``python benchmarks/bench_<op>.py --help``."""
