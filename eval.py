"""Re-tests a trained run with merged weights, on any missing scenario, and exports it for Hugging Face.

    python eval.py --workdir runs/easy_vqa_mora                        # the best checkpoint, as trained
    python eval.py --workdir runs/x --missing.type=image --missing.rate=1.0
    python eval.py --checkpoint runs/x/checkpoints/1200 --export_hf out/  # HF CLIP + head.safetensors
"""

import argparse
import json
import sys
from pathlib import Path

from mora_jax import sharding
from mora_jax.train import cli, evaluation


def main(argv=None) -> int:
  overrides, rest = cli.split_overrides(sys.argv[1:] if argv is None else argv, ["missing", "config"])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a train.py workdir (its best checkpoint is used)")
  source.add_argument("--checkpoint", help="one checkpoint step directory, <workdir>/checkpoints/<step>")
  parser.add_argument("--export_hf", default=None, help="write the merged model here as a Hugging Face checkpoint")
  parser.add_argument("--output", default=None,
                      help="results JSON (default: <workdir>/eval-<type>-<rate>.json next to eval.json)")
  cli.add_common_flags(parser)
  args = parser.parse_args(rest)

  def run() -> int:
    cli.initialize_distributed(args)
    missing = {key: value for prefix, key, value in overrides if prefix == "missing"}
    config_overrides = [(key, value) for prefix, key, value in overrides if prefix == "config"]
    results = evaluation.evaluate_run(args.workdir, args.checkpoint, missing=missing,
                                      export_hf=args.export_hf, config_overrides=config_overrides)
    workdir = Path(args.workdir) if args.workdir else Path(args.checkpoint).parent.parent
    output = Path(args.output) if args.output else (
        workdir / f"eval-{results['missing']['type']}-{results['missing']['rate']}.json")
    if sharding.is_main_process():
      output.write_text(json.dumps(results, indent=2) + "\n")
      print(f"written to {output}")
    return 0

  return cli.run(run, args.debug)


if __name__ == "__main__":
  sys.exit(main())
