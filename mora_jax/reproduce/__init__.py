"""The papers' tables, recomputed by this library beside the published numbers, in one resumable command.

    python -m mora_jax.reproduce easy-vqa                          # the embedded study: nothing to download
    python -m mora_jax.reproduce mora-peft --dry_run               # the runs, time and disk on this host
    python -m mora_jax.reproduce mora-peft --manual_dir ~/raw      # ~/raw/{mm_imdb,upmc_food101,hateful_memes}

tables.py holds every table as data (its runs and the published cells with their source); runs.py the runs on
disk (each is train.py's; a killed one resumes); command.py the command (the plan, the runs, the dry run);
render.py writes `<out>/<table>.{md,csv,png}` after every finished run; throughput.py estimates time and disk
from rates measured on this host. docs/reproduce.md is the user's page. Importing this package loads nothing
heavy, so that `--help` needs neither jax nor TensorFlow Datasets.
"""
