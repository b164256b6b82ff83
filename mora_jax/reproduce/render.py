"""A table's numbers, as far as its runs have gone: `<out>/<table>.md`, `.csv` and `.png`.

Ours is the mean ± std over the seeds whose runs are all done (a cell's value for one seed is the mean of its
measures); beside it the published number and the difference.
"""

import csv
import dataclasses
import io
import statistics
from pathlib import Path

from mora_jax.reproduce import runs
from mora_jax.reproduce.tables import Cell, Table

CSV_COLUMNS = ("table", "row", "column", "ours_mean", "ours_std", "seeds_done", "seeds_planned", "published",
               "difference", "source", "per_seed", "status")


@dataclasses.dataclass(frozen=True)
class CellResult:
  cell: Cell
  per_seed: dict[int, float]  # the seeds whose every measure is done -> the mean of the measures
  planned: int
  absent: bool = False  # the cell's dataset is absent (skipped)

  @property
  def mean(self) -> float | None:
    return statistics.fmean(self.per_seed.values()) if self.per_seed else None

  @property
  def std(self) -> float | None:
    return statistics.stdev(self.per_seed.values()) if len(self.per_seed) > 1 else None

  @property
  def difference(self) -> float | None:
    return None if self.mean is None or self.cell.published is None else self.mean - self.cell.published


def collect(table: Table, options: runs.Options, seeds, absent: set[str] = frozenset()) -> list[CellResult]:
  out = []
  for cell in table.cells:
    per_seed = {}
    for seed in seeds if cell.measures else ():
      values = [runs.value(options, m, seed) for m in cell.measures]
      if all(v is not None for v in values):
        per_seed[seed] = statistics.fmean(values)
    out.append(CellResult(cell, per_seed, len(seeds), any(m.training.dataset in absent for m in cell.measures)))
  return out


def _ours(r: CellResult) -> str:
  if r.mean is None:
    return "not run" if not r.cell.measures else "absent" if r.absent else "…"
  text = f"{r.mean:.2f}" + (f" ± {r.std:.2f}" if r.std is not None else "")
  return text + (f" [{len(r.per_seed)}/{r.planned}]" if len(r.per_seed) < r.planned else "")


def _cell_text(r: CellResult) -> str:
  if r.cell.published is None:
    return _ours(r)
  published = f"{r.cell.published:.2f}"
  if r.mean is None:
    return f"{_ours(r)} ({published})"
  return f"{_ours(r)} ({published}, {r.difference:+.2f})"


def markdown(table: Table, results: list[CellResult], command: str, absent_lines=()) -> str:
  by = {(r.cell.row, r.cell.column): r for r in results}
  has_published = any(r.cell.published is not None for r in results)
  lines = [f"# {table.name}: {table.title}", "", f"`{command}`", "",
           "Ours: mean ± std over seeds" + (" (published, ours − published)" if has_published else "")
           + "; [k/n]: k of the n seeds done so far; …: not run yet.", "",
           "| | " + " | ".join(table.columns) + " |", "|---|" + "---:|" * len(table.columns)]
  for row in table.rows:
    lines.append(f"| {row} | " + " | ".join(_cell_text(by[row, c]) if (row, c) in by else "" for c in table.columns)
                 + " |")
  lines.append("")
  lines += [f"- {row}: not run: {why}." for row, why in table.not_run]
  sources = sorted({str(r.cell.source) for r in results if r.cell.source is not None})
  lines += [f"- Published: {source}." for source in sources]
  if table.note:
    lines.append(f"- {table.note}")
  lines += [f"- {line}" for line in absent_lines]
  return "\n".join(lines) + "\n"


def csv_text(table: Table, results: list[CellResult]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(CSV_COLUMNS)
  for r in results:
    status = "not run" if not r.cell.measures else "absent" if r.absent and r.mean is None else ""
    writer.writerow([table.name, r.cell.row, r.cell.column, _number(r.mean), _number(r.std), len(r.per_seed),
                     r.planned, _number(r.cell.published), _number(r.difference), r.cell.source or "",
                     ";".join(f"{seed}:{v:.4f}" for seed, v in r.per_seed.items()), status])
  return buffer.getvalue()


def _number(value: float | None) -> str:
  return "" if value is None else f"{value:.4f}"


def plot(table: Table, results: list[CellResult], path: Path) -> None:
  """Ours against published, one point per cell (± std), where the table has published numbers; else bars of
  ours per row over the table's plot columns, with the seeds as dots."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  done = [r for r in results if r.mean is not None]
  compared = [r for r in done if r.cell.published is not None]
  if any(r.cell.published is not None for r in results):
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for row in table.rows:
      points = [r for r in compared if r.cell.row == row]
      if points:
        ax.errorbar([r.cell.published for r in points], [r.mean for r in points],
                    yerr=[r.std or 0.0 for r in points], fmt="o", capsize=2, label=row)
    published = [r.cell.published for r in results if r.cell.published is not None]
    low, high = min(published) - 5, max(published) + 5
    ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1, label="ours = published")
    ax.set_xlabel("published")
    ax.set_ylabel("ours (mean ± std over seeds)")
    ax.set_title(f"{table.name}: {len(compared)} of {len(published)} cells measured", fontsize=10)
  else:
    columns = [c for c in table.columns if not table.plot_columns or c in table.plot_columns]
    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / max(len(table.rows), 1)
    by = {(r.cell.row, r.cell.column): r for r in done}
    colours = plt.get_cmap("tab20").colors  # a colour per row for up to 20 rows
    for i, row in enumerate(table.rows):
      positions = [k + (i - (len(table.rows) - 1) / 2) * width for k in range(len(columns))]
      cells = [by.get((row, c)) for c in columns]
      ax.bar(positions, [r.mean if r else 0.0 for r in cells], width, color=colours[i % len(colours)],
             yerr=[(r.std or 0.0) if r else 0.0 for r in cells], capsize=2, label=row)
      dots = [(x, v) for x, r in zip(positions, cells) if r for v in r.per_seed.values()]
      if dots:
        ax.scatter(*zip(*dots), s=5, color="black", zorder=3)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(table.title, fontsize=9)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(table: Table, results: list[CellResult], out: Path, command: str, absent_lines=()) -> Path:
  """`<out>/<table>.md`, `.csv` and `.png`, each written whole then renamed (a reader never sees half a file);
  returns the .md path."""
  out.mkdir(parents=True, exist_ok=True)
  texts = {".md": markdown(table, results, command, absent_lines), ".csv": csv_text(table, results)}
  for suffix, text in texts.items():
    partial = out / f"{table.name}{suffix}.partial"
    partial.write_text(text)
    partial.replace(out / f"{table.name}{suffix}")
  partial = out / f"{table.name}.partial.png"
  plot(table, results, partial)
  partial.replace(out / f"{table.name}.png")
  return out / f"{table.name}.md"
