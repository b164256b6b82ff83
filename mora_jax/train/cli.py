"""The command lines of train.py and eval.py (also installed as `mora-train` and `mora-eval`): flags, config
overrides, multi-process start-up, and errors printed as one line (a traceback only with --debug)."""

import argparse
import difflib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# Without --config: the embedded easy-VQA MoRA recipe, built from the library itself (configs/easy_vqa_mora.py
# holds the same), so the default run needs no file of the repository.
DEFAULT_RECIPE = ("easy_vqa", "mora")
DEFAULT_NAME = "easy_vqa_mora"

OVERRIDES_HELP = """config overrides (after the flags, any number):
  --config.KEY=VALUE or --config.KEY VALUE   KEY is dotted (optim.lr); VALUE a Python literal or plain text,
                                             a tuple as a,b (adapter.targets=q_proj,v_proj)
most used keys:
  dataset                 easy_vqa | mm_imdb | upmc_food101 | hateful_memes | manifest (your own data)
  manual_dir, data_dir    the raw download (mm_imdb, upmc_food101, hateful_memes); the prepared files
  manifest.path           dataset=manifest: your .jsonl or .csv (docs/own_data.md)
  init_from               start from another run's workdir or a PEFT adapter directory (docs/peft.md)
  adapter.method          mora | lora | dora | moka | mmp | dcp | linear (switching keeps targets, rank,
                          start_layer, dropout and towers; the other method's options take the new one's
                          defaults)
  adapter.rank, adapter.alpha, adapter.targets, adapter.start_layer
  optim.lr, epochs, batch_size, accum_steps, max_steps, head.type (linear | mlp)
  missing.type, missing.rate   text | image | both, 0..1
  backbone.path, backbone.dtype, mesh.fsdp
  prefix_cache, prefix_cache_dtype   auto | on | off; auto | float32 | bfloat16 (frozen layers computed once)
"""


class ArgumentError(ValueError):
  """A malformed command line."""


class Parser(argparse.ArgumentParser):
  """argparse's own errors (a missing or malformed flag) raised as ArgumentError, which run_main prints as one
  `error:` line, instead of the usage and a message printed from inside the parser."""

  def error(self, message):
    raise ArgumentError(f"{message} (see {self.prog} --help)")


def path_flag(text: str) -> str:
  """argparse type of a path flag: an empty one (often an unset shell variable) would silently mean the default
  folder, or the current one."""
  if not text:
    raise argparse.ArgumentTypeError("empty path; give a path, or leave the flag out")
  return text


def user_errors() -> tuple[type[BaseException], ...]:
  """Bad input a person can fix; anything else is a bug and keeps its traceback. (Imported here, not at the
  top, so that --help needs neither jax nor transformers.)"""
  from mora_jax.models.hf import WeightsError  # pylint: disable=import-outside-toplevel
  from mora_jax.train import checkpoint, config, job  # pylint: disable=import-outside-toplevel
  return (ArgumentError, config.ConfigError, checkpoint.IncompatibleCheckpoint, checkpoint.NoIntactCheckpoint,
          WeightsError, job.NotWritable, FileNotFoundError, ValueError, KeyError)


def quiet_startup() -> None:
  """Before jax, transformers or tfds are imported: no start-up chatter (TensorFlow's C++ and absl logs,
  transformers' notes on missing optional packages) around the run's own output. Set variables win."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  logging.getLogger("absl").setLevel(logging.ERROR)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
  group = parser.add_argument_group("multi-process (one process per host; see docs/training.md)")
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
      elif i + 1 < len(args) and not args[i + 1].startswith("--"):  # not the next flag, taken as the value
        i += 1
        value = args[i]
      else:
        raise ArgumentError(f"{arg} needs a value: {arg}=VALUE")
      overrides.append((prefix, key, value))
    i += 1
  return overrides, rest


def initialize_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize with the given flags, or (--distributed) with what jax detects on TPU pod
  slices, SLURM and Open MPI. Explicit, because a stray cluster variable must not make a laptop run wait
  for peers."""
  import jax  # pylint: disable=import-outside-toplevel
  if args.coordinator_address or args.num_processes:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def run_main(main: Callable[[], int], debug: bool) -> int:
  """Runs `main`, turning bad input into one line on stderr and exit status 2; SIGTERM into 143."""
  quiet_startup()
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    return main()
  except Exception as e:  # pylint: disable=broad-exception-caught
    from mora_jax.train import loop  # pylint: disable=import-outside-toplevel
    if isinstance(e, loop.Preempted):
      print(str(e), file=sys.stderr)
      return 143
    if not isinstance(e, user_errors()):
      raise
    if debug:
      traceback.print_exc()
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    return 2


def default_config():
  """The default run's config (locked, as a config file's)."""
  from mora_jax.train import recipes  # pylint: disable=import-outside-toplevel
  config = recipes.get(*DEFAULT_RECIPE)
  config.lock()
  return config


def train_parser() -> argparse.ArgumentParser:
  parser = Parser(
      description="Trains an adapter on a frozen CLIP, then tests the best checkpoint per missing scenario.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=OVERRIDES_HELP + """example:
  python train.py --config configs/food101_mora.py --config.adapter.method=lora --config.optim.lr=5e-3 \\
      --config.manual_dir=~/raw/food101 --workdir runs/food101_lora
Re-running with the same --workdir resumes from its latest checkpoint.""")
  parser.add_argument("--config", default=None, type=path_flag,
                      help=f"a config file (configs/*.py); default: the {DEFAULT_NAME} recipe")
  parser.add_argument("--workdir", default=None, type=path_flag, help="default: runs/<config file name>")
  add_common_flags(parser)
  return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str], prefixes: Sequence[str]):
  """(the `--<prefix>.KEY=VALUE` overrides, the parsed flags) of a command line."""
  overrides, rest = split_overrides(argv, prefixes)
  args, unknown = parser.parse_known_args(rest)
  if unknown:
    parser.error(unrecognized(unknown, prefixes))
  return overrides, args


def unrecognized(unknown: Sequence[str], prefixes: Sequence[str]) -> str:
  """The error of flags the parser does not know; a dotted one is taken for an override with a mistyped prefix
  (--confg.epochs=2), for which the closest prefix (else the last, config) is suggested."""
  dotted = [arg for arg in unknown if arg.startswith("--") and "." in arg.split("=", 1)[0]]
  if not dotted:
    return f"unrecognized arguments: {' '.join(unknown)}"
  head, tail = dotted[0][2:].split(".", 1)
  close = difflib.get_close_matches(head, prefixes, n=1)
  return (f"unrecognized argument {dotted[0]}: overrides are "
          f"{' or '.join(f'--{prefix}.KEY=VALUE' for prefix in prefixes)}; did you mean "
          f"--{close[0] if close else prefixes[-1]}.{tail}?")


def train_main(argv=None) -> int:
  """train.py and mora-train."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = train_parser()

  def run() -> int:
    overrides, args = parse(parser, argv, ["config"])
    initialize_distributed(args)
    from mora_jax.train import config as config_lib, loop  # pylint: disable=import-outside-toplevel
    config = config_lib.load(args.config) if args.config else default_config()
    config_lib.apply_overrides(config, [(key, value) for _, key, value in overrides])
    loop.train(config, args.workdir or f"runs/{Path(args.config).stem if args.config else DEFAULT_NAME}")
    return 0

  return run_main(run, "--debug" in argv)


def eval_parser() -> argparse.ArgumentParser:
  parser = Parser(
      description="Re-tests a trained run with merged weights, on any missing scenario, and exports it.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="""missing scenario (default: the run's own):
  --missing.type=text|image|both  --missing.rate=0..1  --missing.seed=N
""" + OVERRIDES_HELP.replace("config overrides (after the flags, any number)",
                             "config overrides (on the run's saved config, e.g. data_dir or eval.batch_size)") +
      """examples:
  python eval.py --workdir runs/food101_mora --missing.type=image --missing.rate=1.0
  python eval.py --workdir runs/food101_mora --export_hf out/food101_mora --no_test""")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", type=path_flag, help="a train.py workdir (its best checkpoint is used)")
  source.add_argument("--checkpoint", type=path_flag,
                      help="one checkpoint step directory, <workdir>/checkpoints/<step>")
  parser.add_argument("--export_hf", default=None, type=path_flag,
                      help="write the merged model here: a Hugging Face CLIP checkpoint with its processor, the "
                      "head (head.safetensors, head.json) and a model card (README.md)")
  parser.add_argument("--export_peft", default=None, type=path_flag,
                      help="LoRA/DoRA: write the adapters here as a PEFT adapter directory (for transformers' "
                      "CLIPModel)")
  parser.add_argument("--no_test", action="store_true", help="with --export_hf/--export_peft: export without testing")
  parser.add_argument("--output", default=None, type=path_flag,
                      help="results JSON (default: <workdir>/eval-<type>-<rate>.json next to eval.json)")
  add_common_flags(parser)
  return parser


# What eval.py may change in a run's config: where the data is, how fast it is read and evaluated, the numeric
# precision of the frozen backbone. Anything else (adapter, head, backbone weights, preprocessing, ...) would test
# a model the run never trained and report it as the run's. A moved manifest is found again with manifest.path
# (the checkpoint's data check still guards its content). Some keys are of one family only (eval.test_samples and
# lm.cache_dir: MLLM runs; manual_dir, manifest.*, the data-reading, prefix_cache and mesh keys: classifier runs);
# a key the run's config lacks is refused as unknown.
EVAL_OVERRIDABLE = ("data_dir", "manual_dir", "manifest.path", "manifest.image_root", "eval.batch_size",
                    "eval.test_samples", "data_threads", "data_workers", "pixel_store", "prefix_cache",
                    "prefix_cache_dtype", "prefix_cache_memory_gb", "prefix_cache_device_gb", "skip_corrupt",
                    "mesh.data", "mesh.fsdp", "backbone.dtype", "backbone.cache_dir", "lm.cache_dir")


def run_config(workdir: Path):
  """The config train.py saved in `workdir`; the default run's where there is none (no run there, which
  evaluate_run reports after the overrides are checked)."""
  from mora_jax.train import config as config_lib, job  # pylint: disable=import-outside-toplevel
  saved = job.read_config_file(workdir)
  return config_lib.from_json(json.dumps(saved)) if saved is not None else default_config()


def check_eval_overrides(config_overrides, config) -> None:
  """Refuses an eval.py override of a key the run's `config` lacks (with the closest key, as train.py), then one
  that changes the trained model, naming it and what may change."""
  from mora_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  for key, _ in config_overrides:
    config_lib.locate(config, key)
    if key not in EVAL_OVERRIDABLE:
      raise ArgumentError(f"--config.{key}: eval.py re-tests the model the run trained, which this would change; it "
                          f"may change only {', '.join(EVAL_OVERRIDABLE)} (train a new run for anything else).")


def check_outputs(args, workdir: Path) -> None:
  """Every file and folder eval.py will write, checked before the test, whose results would otherwise be lost."""
  from mora_jax.train.job import check_creatable  # pylint: disable=import-outside-toplevel
  if args.output:
    output = Path(args.output)
    if output.is_dir():
      raise ArgumentError(f"--output {output} is a folder; give a file path for the results JSON.")
    check_creatable(output.parent, "--output")
  elif not args.no_test and workdir.is_dir():  # a missing workdir is evaluate_run's error to report
    check_creatable(workdir, "--output")
  for flag, directory in (("--export_hf", args.export_hf), ("--export_peft", args.export_peft)):
    if directory is not None:
      check_creatable(Path(directory), flag)
      check_export_folder(Path(directory), workdir, flag)


def export_files() -> dict[str, tuple[str, ...]]:
  """The files each export flag writes (the tokenizer's aside), which an existing export folder must not hold."""
  # pylint: disable=import-outside-toplevel
  from mora_jax.adapters import peft
  from mora_jax.models import hf
  from mora_jax.train import export
  head = (export.HEAD_FILE, export.HEAD_INFO_FILE)
  return {"--export_hf": (hf.CONFIG_FILE, hf.SAFETENSORS_FILE, hf.PREPROCESSOR_FILE, export.CARD_FILE, *head),
          "--export_peft": (peft.CONFIG_FILE, peft.WEIGHTS_FILE, *head)}


def check_export_folder(directory: Path, workdir: Path, flag: str) -> None:
  """Refuses an export folder that is the run's workdir or holds it (the export's config.json would replace the
  run's, its adapter_config.json make the run read as a PEFT folder), or that already holds a file the export
  writes: either would be overwritten without a word. A folder inside the workdir (<workdir>/hf) is fine."""
  if workdir.resolve().is_relative_to(directory.resolve()):
    raise ArgumentError(f"{flag} {directory} is or holds the run's workdir {workdir}, whose files the export would "
                        "overwrite or mix with; choose another folder (e.g. a new one outside the workdir).")
  clashes = [name for name in export_files()[flag] if (directory / name).exists()]
  if clashes:
    raise ArgumentError(f"{flag} {directory} already holds {', '.join(clashes)}, which the export would overwrite; "
                        "choose an empty or new folder.")


def eval_main(argv=None) -> int:
  """eval.py and mora-eval."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = eval_parser()

  def run() -> int:
    overrides, args = parse(parser, argv, ["missing", "config"])
    if args.no_test and not (args.export_hf or args.export_peft):
      raise ArgumentError("--no_test skips the test, so it needs --export_hf OUT or --export_peft OUT (otherwise "
                          "there is nothing to do).")
    initialize_distributed(args)
    from mora_jax import sharding  # pylint: disable=import-outside-toplevel
    from mora_jax.train import answering, evaluation  # pylint: disable=import-outside-toplevel
    missing = {key: value for prefix, key, value in overrides if prefix == "missing"}
    config_overrides = [(key, value) for prefix, key, value in overrides if prefix == "config"]
    workdir = Path(args.workdir) if args.workdir else Path(args.checkpoint).parent.parent
    check_eval_overrides(config_overrides, run_config(workdir))
    check_outputs(args, workdir)
    if answering.is_run(workdir):
      if args.export_hf or args.export_peft:
        raise ArgumentError("--export_hf/--export_peft export CLIP runs; an MLLM run's adapters stay in its "
                            "checkpoints.")
      results = answering.evaluate_run(args.workdir, args.checkpoint, missing=missing,
                                       config_overrides=config_overrides)
    else:
      results = evaluation.evaluate_run(args.workdir, args.checkpoint, missing=missing, export_hf=args.export_hf,
                                        export_peft=args.export_peft, config_overrides=config_overrides,
                                        test=not args.no_test)
    if args.no_test:
      return 0
    output = Path(args.output) if args.output else evaluation.retest_file(
        workdir, results["missing"]["type"], results["missing"]["rate"])
    if sharding.is_main_process():
      output.write_text(json.dumps(results, indent=2) + "\n")
      print(f"written to {output}")
    return 0

  return run_main(run, "--debug" in argv)
