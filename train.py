"""Trains an adapter on a frozen CLIP, then tests the best checkpoint with merged weights per missing scenario.

    python train.py                                   # MoRA on easy-VQA, 70% missing (both), small CLIP
    python train.py --config configs/food101_mora.py --config.optim.lr=5e-3 --workdir runs/food101_mora

Re-running with the same --workdir resumes from its latest checkpoint. Results: <workdir>/eval.json,
metrics.jsonl, tensorboard/, config.json.
"""

import argparse
import sys
from pathlib import Path

from mora_jax.train import cli, config as config_lib, loop


def main(argv=None) -> int:
  overrides, rest = cli.split_overrides(sys.argv[1:] if argv is None else argv, ["config"])
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(cli.DEFAULT_CONFIG), help="a config file (configs/*.py)")
  parser.add_argument("--workdir", default=None, help="default: runs/<config file name>")
  cli.add_common_flags(parser)
  args = parser.parse_args(rest)

  def run() -> int:
    cli.initialize_distributed(args)
    config = config_lib.load(args.config)
    config_lib.apply_overrides(config, [(key, value) for _, key, value in overrides])
    workdir = args.workdir or f"runs/{Path(args.config).stem}"
    loop.train(config, workdir)
    return 0

  return cli.run(run, args.debug)


if __name__ == "__main__":
  sys.exit(main())
