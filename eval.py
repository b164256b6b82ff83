"""Re-tests a trained run with merged weights, on any missing scenario, and exports it for Hugging Face.

    python eval.py --workdir runs/easy_vqa_mora                        # the best checkpoint, as trained
    python eval.py --workdir runs/x --missing.type=image --missing.rate=1.0
    python eval.py --checkpoint runs/x/checkpoints/1200 --export_hf out/  # HF CLIP + head.safetensors
"""

import sys

from mora_jax.train.cli import eval_main as main

if __name__ == "__main__":
  sys.exit(main())
