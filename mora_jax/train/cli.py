"""The command lines of train.py and eval.py: flags, config overrides, multi-process start-up, and errors
printed as one line (a traceback only with --debug)."""

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from mora_jax.models.hf import CheckpointError
from mora_jax.train import checkpoint, config as config_lib, job, loop

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "easy_vqa_mora.py"
# Bad input a person can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (config_lib.ConfigError, checkpoint.IncompatibleCheckpoint, checkpoint.NoIntactCheckpoint,
               CheckpointError, job.NotWritable, FileNotFoundError, ValueError, KeyError)


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


def run(main: Callable[[], int], debug: bool) -> int:
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
