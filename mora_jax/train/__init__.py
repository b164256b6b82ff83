"""Training and evaluation: configs, the jitted steps over a device mesh, orbax checkpoints, the loop.

    from mora_jax.train import config, loop
    cfg = config.load("configs/food101_mora.py")
    results = loop.train(cfg, "runs/food101_mora")   # eval.json, metrics.jsonl, tensorboard/ in the workdir
"""
