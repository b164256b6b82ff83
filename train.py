"""Trains an adapter on a frozen CLIP, then tests the best checkpoint with merged weights per missing scenario.

    python train.py                                   # MoRA on easy-VQA, 70% missing (both), small CLIP
    python train.py --config configs/food101_mora.py --config.optim.lr=5e-3 --workdir runs/food101_mora

Re-running with the same --workdir resumes from its latest checkpoint. Results: <workdir>/eval.json,
metrics.jsonl, tensorboard/, config.json.
"""

import sys

from mora_jax.train.cli import train_main as main

if __name__ == "__main__":
  sys.exit(main())
