"""The command: a table's plan, its runs with the tables re-rendered after each, and the dry run.

    python -m mora_jax.reproduce TABLE [--dry_run] [--seeds ...] [--data_dir D] [--manual_dir ...] [--config.KEY=VALUE]
"""

import contextlib
import dataclasses
import sys
from pathlib import Path

from mora_jax import sharding
from mora_jax.console import say
from mora_jax.reproduce import render, runs, throughput
from mora_jax.reproduce.tables import Table, Training
from mora_jax.train import job


@dataclasses.dataclass(frozen=True)
class Planned:
  """A (training, seed) run of a table, in the order the table runs them (seed-major: a partial table covers every
  cell with a first seed before any second one)."""
  training: Training
  seed: int
  retests: tuple[tuple[str, float], ...]  # the re-tests its cells read


def plan(table: Table, seeds, absent: set[str] = frozenset()) -> list[Planned]:
  retests = {}
  for cell in table.cells:
    for m in cell.measures:
      retests.setdefault(m.training, [])
      if m.retest and m.retest not in retests[m.training]:
        retests[m.training].append(m.retest)
  return [Planned(t, seed, tuple(retests[t])) for seed in seeds for t in table.trainings if t.dataset not in absent]


def absent_datasets(table: Table, options: runs.Options) -> dict[str, str]:
  """dataset -> the line saying what to download and where, for each of the table's datasets that is absent."""
  lines = {dataset: runs.absent(dataset, options) for dataset in table.datasets}
  return {dataset: line for dataset, line in lines.items() if line}


def check_overrides(table: Table, options: runs.Options) -> None:
  """Every run's config built and checked (job.validate; where its dataset is present, its files too) before any
  work, so that a mistyped --config key or an impossible value stops the command at once, not after hours of
  earlier runs."""
  absent = absent_datasets(table, options)
  for training in table.trainings:
    config = runs.config_of(training, table.seeds[0], options, build_backbone=False)
    job.validate(config, sources=training.dataset not in absent)


def run_table(table: Table, options: runs.Options, seeds, out: Path, command: str, step_hook=None):
  """Runs what is missing of `table` (each run resumed if it was interrupted), re-rendering `<out>/<table>.*`
  after every finished run; returns the cell results."""
  absent = absent_datasets(table, options)
  for line in absent.values():
    say(line)
  planned = plan(table, seeds, set(absent))
  todo = [p for p in planned if not (runs.is_done(options, p.training, p.seed) and all(
      runs.retest_file(runs.run_dir(options, p.training, p.seed), r).is_file() for r in p.retests))]
  say(f"{table.name}: {len(planned)} runs, {len(planned) - len(todo)} done, {len(todo)} to run; workdir "
      f"{options.workdir}, tables in {out}")

  def write() -> list[render.CellResult]:
    results = render.collect(table, options, seeds, set(absent))
    if sharding.is_main_process():
      render.write(table, results, out, command, absent.values())
    return results

  results = write()
  for k, p in enumerate(todo, 1):
    say(f"[{k}/{len(todo)}] {p.training.dataset}/{p.training.name}, seed {p.seed}: "
        f"{runs.run_dir(options, p.training, p.seed)}")
    directory = runs.train(options, p.training, p.seed, step_hook=step_hook)
    for retest in p.retests:
      runs.retest(directory, retest)
    results = write()
  say(f"{table.name}: written to {out / table.name}.md")
  return results


def dry_run(table: Table, options: runs.Options, seeds, measure: bool = True) -> str:
  """The table's runs, what is done, and the time and disk each run needs on this host (measured rates; see
  throughput.py), as a markdown report."""
  absent = absent_datasets(table, options)
  planned = plan(table, seeds)
  by_training = {}
  for p in planned:
    by_training.setdefault(p.training, []).append(p.seed)
  lines = [f"{table.name}: {len(planned)} runs ({len(by_training)} configs x {len(seeds)} seeds: "
           f"{' '.join(map(str, seeds))}); workdir {options.workdir}", ""]
  lines += [f"- {line}" for line in absent.values()]
  lines += ["", "| run | done | re-tests | estimated time per run | checkpoints per run |", "|---|---|---|---:|---:|"]
  left_seconds, unknown, shared = 0.0, 0, {}
  for training, training_seeds in by_training.items():
    config = runs.config_of(training, training_seeds[0], options, build_backbone=False)
    with contextlib.redirect_stdout(sys.stderr):  # a probe's run prints as a run does; stdout is the report's
      measured = throughput.rates(config, options.workdir) if measure else None
    guess = throughput.estimate(config, measured)
    done = [s for s in training_seeds if runs.is_done(options, training, s)]
    walls = [w for w in (runs.wall_seconds(options, training, s) for s in done) if w is not None]
    seconds = max(walls) if walls else guess.seconds
    how = "measured" if walls else "estimated"
    if seconds is None:
      unknown += len(training_seeds) - len(done)
    else:
      left_seconds += seconds * (len(training_seeds) - len(done))
    retests = len({m.retest for c in table.cells for m in c.measures if m.training == training and m.retest})
    lines.append(f"| {training.dataset}/{training.name} | {len(done)}/{len(training_seeds)} | {retests or ''} | "
                 f"{_duration(seconds)} ({how}) | {_size(guess.checkpoint_bytes)} |")
    entry = shared.setdefault(training.dataset, [0, 0])
    entry[0] = max(entry[0], guess.pixel_store_bytes)
    entry[1] = max(entry[1], guess.prefix_cache_disk_bytes)
  lines += ["", f"Left: {_duration(left_seconds)} on this host"
            + (f", plus {unknown} runs without an estimate" if unknown else "")
            + ("" if measure else " (rates not measured: --no_measure)") + "."]
  for dataset, (pixel, prefix) in shared.items():
    if pixel or prefix:
      lines.append(f"- {dataset}, shared by its runs: pixel store {_size(pixel)}, prefix cache files {_size(prefix)}.")
  return "\n".join(lines) + "\n"


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "unknown"
  if seconds < 120:
    return f"{seconds:.0f} s"
  return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _size(count: int | None) -> str:
  if count is None:
    return "unknown"
  if count < 2**20:
    return f"{count / 2**10:.0f} KiB"
  return f"{count / 2**20:.1f} MiB" if count < 2**30 else f"{count / 2**30:.1f} GiB"


