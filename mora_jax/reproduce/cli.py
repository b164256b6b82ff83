"""`python -m mora_jax.reproduce` and `mora-reproduce`: the flags, then command.py (imported once the flags
parse, so that --help and a mistyped flag need neither jax nor TensorFlow Datasets)."""

import argparse
import shlex
import sys
from pathlib import Path

from mora_jax.reproduce.tables import TABLES
from mora_jax.train import cli

DEFAULT_WORKDIR = "runs/reproduce"


def parser() -> cli.Parser:
  p = cli.Parser(
      prog="python -m mora_jax.reproduce",
      description="Recomputes a table of the papers with this library, beside the published numbers: runs what is "
                  "missing (an interrupted run resumes), writes <out>/TABLE.md, .csv and .png after every run.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="tables:\n" + "\n".join(f"  {name:<15} {table.title}" for name, table in TABLES.items()) + """

--config.KEY=VALUE applies to every run of the table (e.g. --config.data_workers=8); a finished run made with
other values is refused, not reused. Runs are shared between tables: mora-peft's DCP runs are dcp-table4's.""")
  p.add_argument("table", help=f"one of: {', '.join(TABLES)}")
  p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                 help="only these rows of the table (quoted names, as the table prints them); the table file then "
                      "shows those rows")
  p.add_argument("--seeds", nargs="+", type=int, default=None,
                 help="fine-tuning seeds (default: the table's, "
                      + "; ".join(f"{name} {' '.join(map(str, t.seeds))}" for name, t in TABLES.items()) + ")")
  p.add_argument("--workdir", default=DEFAULT_WORKDIR, type=cli.path_flag,
                 help="where runs live: <workdir>/<dataset>/<run>/seed<seed> (default: %(default)s)")
  p.add_argument("--out", default=None, type=cli.path_flag, help="where TABLE.md/.csv/.png go (default: the workdir)")
  p.add_argument("--data_dir", default="data", type=cli.path_flag,
                 help="prepared datasets and missing tables (config.data_dir; default: %(default)s)")
  p.add_argument("--manual_dir", nargs="+", default=[], metavar="[DATASET=]PATH",
                 help="the raw downloads: DATASET=PATH per dataset, or one PATH holding a folder per dataset "
                      "(mm_imdb/, upmc_food101/, hateful_memes/); docs/protocol.md says what goes in them")
  p.add_argument("--cache_dir", default="~/.cache/mora_jax", type=cli.path_flag,
                 help="where the embedded backbone (easy-vqa, mllm) and the embedded LM (mllm) are built")
  p.add_argument("--dry_run", action="store_true",
                 help="list the runs, what is done, time and disk per run on this host; run nothing (one process: "
                      "the multi-process flags are not used)")
  p.add_argument("--render_only", action="store_true",
                 help="write <out>/TABLE.md/.csv/.png from the runs that exist; run nothing")
  p.add_argument("--no_measure", action="store_true",
                 help="with --dry_run: do not measure this host's rates (a minute or more per recipe on a CPU)")
  cli.add_common_flags(p)
  return p


def manual_dirs(values, datasets) -> tuple[tuple[str, str], ...]:
  """--manual_dir values -> (dataset, folder) pairs: DATASET=PATH, or a root holding <dataset>/ folders. A folder
  that does not exist, or a root with none of them, is refused (a typo would skip a whole dataset)."""
  pairs = {}
  for value in values:
    name, sep, path = value.partition("=")
    if sep:
      if name not in datasets:
        raise cli.ArgumentError(f"--manual_dir {value}: unknown dataset {name!r}; use one of {list(datasets)}.")
      if not path or not Path(path).expanduser().is_dir():
        raise cli.ArgumentError(f"--manual_dir {value}: {path or 'the empty path'} is not a folder; give the "
                                f"folder of your {name} download.")
      pairs[name] = path
    else:
      root = Path(value).expanduser()
      found = {d: str(root / d) for d in datasets if (root / d).is_dir()}
      if not found:
        raise cli.ArgumentError(f"--manual_dir {value} holds none of {', '.join(f'{d}/' for d in datasets)}; give "
                                "the folder that holds them, or DATASET=PATH per dataset.")
      pairs.update({d: path for d, path in found.items() if d not in pairs})
  return tuple(pairs.items())


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = parser()

  def run() -> int:
    overrides, args = cli.parse(p, argv, ["config"])
    if args.table not in TABLES:
      raise cli.ArgumentError(f"unknown table {args.table!r}; use one of: {', '.join(TABLES)}.")
    table = TABLES[args.table].restricted(args.rows) if args.rows else TABLES[args.table]
    seeds = tuple(args.seeds) if args.seeds else table.seeds
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
      raise cli.ArgumentError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds >= 0.")
    if args.no_measure and not args.dry_run:
      raise cli.ArgumentError("--no_measure goes with --dry_run (a table's runs measure themselves).")
    if args.out and args.dry_run:
      raise cli.ArgumentError("--out is where a table's runs write it; --dry_run prints its report instead.")
    if not args.dry_run:
      cli.initialize_distributed(args)
    from mora_jax import data  # pylint: disable=import-outside-toplevel
    from mora_jax.reproduce import command, runs  # pylint: disable=import-outside-toplevel
    options = runs.Options(workdir=Path(args.workdir).expanduser(), data_dir=args.data_dir,
                           manual_dirs=manual_dirs(args.manual_dir, [d for d in data.BUILDERS if d != "easy_vqa"]),
                           cache_dir=args.cache_dir, overrides=tuple((k, v) for _, k, v in overrides))
    if args.dry_run:
      print(command.dry_run(table, options, seeds, measure=not args.no_measure), end="")
      return 0
    out = Path(args.out).expanduser() if args.out else options.workdir
    command.run_table(table, options, seeds, out, "python -m mora_jax.reproduce " + shlex.join(argv),
                      run=not args.render_only)
    return 0

  return cli.run_main(run, "--debug" in argv)
