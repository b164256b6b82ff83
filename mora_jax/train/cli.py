"""The command lines of train.py and eval.py (also installed as `mora-train` and `mora-eval`): flags, config
overrides, multi-process start-up, and errors printed as one line (a traceback only with --debug)."""

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from mora_jax import sharding
from mora_jax.models.hf import WeightsError
from mora_jax.train import checkpoint, config as config_lib, evaluation, job, loop, recipes

# Without --config: the embedded easy-VQA MoRA recipe, built from the library itself (configs/easy_vqa_mora.py
# holds the same), so the default run needs no file of the repository.
DEFAULT_RECIPE = ("easy_vqa", "mora")
DEFAULT_NAME = "easy_vqa_mora"
# Bad input a person can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (config_lib.ConfigError, checkpoint.IncompatibleCheckpoint, checkpoint.NoIntactCheckpoint,
               WeightsError, job.NotWritable, FileNotFoundError, ValueError, KeyError)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
  group = parser.add_argument_group("multi-process (one process per host; see README)")
  group.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() and let it detect the cluster (TPU pod, SLURM, MPI)")
  group.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  group.add_argument("--num_processes", type=int, default=None)
  group.add_argument("--process_id", type=int, default=None)


def split_overrides(args: Sequence[str], prefixes: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """`--config.a.b=v` / `--config.a.b v` pairs (for each prefix, keys without it), and the other args."""
  overrides, rest, i = [], [], 0
  while i < len(args):
    arg = args[i]
    prefix = next((p for p in prefixes if arg.startswith(f"--{p}.")), None)
    if prefix is None:
      rest.append(arg)
    else:
      key = arg[len(prefix) + 3:]
      if "=" in key:
        key, value = key.split("=", 1)
      elif i + 1 < len(args):
        i += 1
        value = args[i]
      else:
        raise config_lib.ConfigError(f"{arg} needs a value: {arg}=VALUE")
      overrides.append((prefix, key, value))
    i += 1
  return overrides, rest


def initialize_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize with the given flags, or (--distributed) with what jax detects on TPU pod
  slices, SLURM and Open MPI. Explicit, because a stray cluster variable must not make a laptop run wait
  for peers."""
  if args.coordinator_address or args.num_processes:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def run_main(main: Callable[[], int], debug: bool) -> int:
  """Runs `main`, turning bad input into one line on stderr and exit status 2; SIGTERM into 143."""
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    return main()
  except loop.Preempted as e:
    print(str(e), file=sys.stderr)
    return 143
  except USER_ERRORS as e:
    if debug:
      traceback.print_exc()
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    return 2


def default_config():
  """The default run's config (locked, as a config file's)."""
  config = recipes.get(*DEFAULT_RECIPE)
  config.lock()
  return config


def train_main(argv=None) -> int:
  """train.py and mora-train."""
  overrides, rest = split_overrides(sys.argv[1:] if argv is None else argv, ["config"])
  parser = argparse.ArgumentParser(
      description="Trains an adapter on a frozen CLIP, then tests the best checkpoint per missing scenario.")
  parser.add_argument("--config", default=None,
                      help=f"a config file (configs/*.py); default: the {DEFAULT_NAME} recipe")
  parser.add_argument("--workdir", default=None, help="default: runs/<config file name>")
  add_common_flags(parser)
  args = parser.parse_args(rest)

  def run() -> int:
    initialize_distributed(args)
    config = config_lib.load(args.config) if args.config else default_config()
    config_lib.apply_overrides(config, [(key, value) for _, key, value in overrides])
    workdir = args.workdir or f"runs/{Path(args.config).stem if args.config else DEFAULT_NAME}"
    loop.train(config, workdir)
    return 0

  return run_main(run, args.debug)


def eval_main(argv=None) -> int:
  """eval.py and mora-eval."""
  overrides, rest = split_overrides(sys.argv[1:] if argv is None else argv, ["missing", "config"])
  parser = argparse.ArgumentParser(
      description="Re-tests a trained run with merged weights, on any missing scenario, and exports it.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a train.py workdir (its best checkpoint is used)")
  source.add_argument("--checkpoint", help="one checkpoint step directory, <workdir>/checkpoints/<step>")
  parser.add_argument("--export_hf", default=None, help="write the merged model here as a Hugging Face checkpoint")
  parser.add_argument("--export_peft", default=None,
                      help="LoRA/DoRA: write the adapters here as a PEFT adapter directory (for transformers' CLIPModel)")
  parser.add_argument("--output", default=None,
                      help="results JSON (default: <workdir>/eval-<type>-<rate>.json next to eval.json)")
  add_common_flags(parser)
  args = parser.parse_args(rest)

  def run() -> int:
    initialize_distributed(args)
    missing = {key: value for prefix, key, value in overrides if prefix == "missing"}
    config_overrides = [(key, value) for prefix, key, value in overrides if prefix == "config"]
    results = evaluation.evaluate_run(args.workdir, args.checkpoint, missing=missing,
                                      export_hf=args.export_hf, config_overrides=config_overrides,
                                      export_peft=args.export_peft)
    workdir = Path(args.workdir) if args.workdir else Path(args.checkpoint).parent.parent
    output = Path(args.output) if args.output else (
        workdir / f"eval-{results['missing']['type']}-{results['missing']['rate']}.json")
    if sharding.is_main_process():
      output.write_text(json.dumps(results, indent=2) + "\n")
      print(f"written to {output}")
    return 0

  return run_main(run, args.debug)
