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
from mora_jax.reproduce.tables import MLLM, Table, Training


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


def check_plan(table: Table, options: runs.Options, seeds) -> dict[str, str]:
  """Everything that can be checked before the first run, so that a mistake stops the command at once, not after
  hours of earlier runs: no --config override of a key the table sets per run; every run's config built and
  checked (runs.validate; where its dataset is present, its files too); no run folder holding another config's
  run. Returns absent_datasets."""
  runs.check_overrides(options.overrides, table.trainings)
  absent = absent_datasets(table, options)
  for training in table.trainings:
    for seed in seeds:
      config = runs.config_of(training, seed, options, build_backbone=False)
      runs.check_same_run(runs.run_dir(options, training, seed), config)
    runs.validate(config, sources=training.dataset not in absent)
  return absent


def run_table(table: Table, options: runs.Options, seeds, out: Path, command: str, step_hook=None, run=True):
  """Runs what is missing of `table` (each run resumed if it was interrupted), re-rendering `<out>/<table>.*`
  after every finished run; returns the cell results (on process 0; [] on the others). With several processes
  they agree on what is done (what each sees of the shared files) before each collective step. `run=False`:
  only renders what exists."""
  absent = check_plan(table, options, seeds)
  for line in absent.values():
    say(line)
  planned = plan(table, seeds, set(absent))
  done = sharding.on_every_process([runs.is_done(options, p.training, p.seed, p.retests) for p in planned])
  todo = [p for p, finished in zip(planned, done) if not finished]
  say(f"{table.name}: {len(planned)} runs, {len(planned) - len(todo)} done, {len(todo)} to run; workdir "
      f"{options.workdir}, tables in {out}")

  def write() -> list[render.CellResult]:
    if not sharding.is_main_process():
      return []
    results = render.collect(table, options, seeds, set(absent))
    render.write(table, results, out, command, absent.values())
    return results

  results = write()
  for k, p in enumerate(todo if run else (), 1):
    say(f"[{k}/{len(todo)}] {p.training.dataset}/{p.training.name}, seed {p.seed}: "
        f"{runs.run_dir(options, p.training, p.seed)}")
    if not sharding.on_every_process(runs.is_done(options, p.training, p.seed)):
      runs.train(options, p.training, p.seed, step_hook=step_hook)
    for retest in p.retests:
      if not sharding.on_every_process(runs.is_done(options, p.training, p.seed, (retest,))):
        runs.retest(options, p.training, p.seed, retest)
    results = write()
  say(f"{table.name}: written to {out / table.name}.md")
  return results


def dry_run(table: Table, options: runs.Options, seeds, measure: bool = True) -> str:
  """The table's runs, what is done, and the time and disk each run needs on this host (measured rates; see
  throughput.py), as a markdown report. One process: its probes measure this host. MLLM runs are not probed:
  the table's finished MLLM runs on this host time them (throughput.from_finished_runs)."""
  absent = check_plan(table, options, seeds)
  planned = plan(table, seeds)
  finished_mllm = [runs.run_dir(options, p.training, p.seed) for p in planned
                   if p.training.task == MLLM and runs.is_done(options, p.training, p.seed)]
  lines = [f"{table.name}: {len(planned)} runs ({len(table.trainings)} configs x {len(seeds)} seeds: "
           f"{' '.join(map(str, seeds))}); workdir {options.workdir}", ""]
  lines += [f"- {line}" for line in absent.values()]
  lines += ["", "| run | done | re-tests | time per run | checkpoints per run |", "|---|---|---|---:|---:|"]
  left_seconds, unknown, pixel_stores, prefix_caches = 0.0, 0, {}, {}
  for training in table.trainings:
    seeds_of = [p for p in planned if p.training == training]
    retests = seeds_of[0].retests
    config = runs.config_of(training, seeds_of[0].seed, options, build_backbone=False)
    if training.task == MLLM:
      guess = throughput.from_finished_runs(finished_mllm)
    else:
      with contextlib.redirect_stdout(sys.stderr):  # a probe's run prints as a run does; stdout is the report's
        measured = throughput.rates(config, options.workdir) if measure else None
      guess = throughput.estimate(config, measured)
    done = [p.seed for p in seeds_of if runs.is_done(options, training, p.seed, retests)]
    walls = [w for w in (runs.wall_seconds(options, training, seed) for seed in done) if w is not None]
    if walls:  # training, test and re-tests as they ran here
      seconds, how = max(walls), "measured"
    elif guess.seconds is not None:
      seconds = guess.seconds + len(retests) * guess.retest_seconds
      how = "estimated: the longest finished MLLM run" if training.task == MLLM else (
          f"estimated{f', {len(retests)} re-tests included' if retests else ''}")
    else:
      seconds, how = None, "no rate for this backbone" if measure and training.task != MLLM else "not measured"
    left = len(seeds_of) - len(done)
    if seconds is None:
      unknown += left
    else:
      left_seconds += seconds * left
    lines.append(f"| {training.dataset}/{training.name} | {len(done)}/{len(seeds_of)} | {len(retests) or ''} | "
                 f"{_duration(seconds)} ({how}) | {_size(guess.checkpoint_bytes)} |")
    pixel_stores[training.dataset] = max(pixel_stores.get(training.dataset, 0), guess.pixel_store_bytes)
    # One prefix cache per dataset and first adapted layer (the linear probe's: the final features).
    layer = (training.dataset, config.adapter.method == "linear", config.adapter.get("start_layer"))
    prefix_caches[layer] = max(prefix_caches.get(layer, 0), guess.prefix_cache_disk_bytes)
  lines += ["", f"Left: {_duration(left_seconds)} on this host"
            + (f", plus {unknown} runs without an estimate" if unknown else "")
            + ("" if measure else " (rates not measured: --no_measure)") + "."]
  for dataset in table.datasets:
    prefix = sum(size for (name, *_), size in prefix_caches.items() if name == dataset)
    parts = [f"{what} {_size(size)}" for what, size in (("pixel store", pixel_stores.get(dataset, 0)),
                                                         ("prefix cache files", prefix)) if size]
    if parts:
      lines.append(f"- {dataset}, shared by its runs: {', '.join(parts)}.")
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


