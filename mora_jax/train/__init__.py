"""Training and evaluation: configs, the jitted steps over a device mesh, orbax checkpoints, the loop.

    from mora_jax.train import config, evaluation, loop
    cfg = config.load("configs/food101_mora.py")
    results = loop.train(cfg, "runs/food101_mora")   # eval.json, metrics.jsonl, tensorboard/ in the workdir
    again = evaluation.evaluate_run("runs/food101_mora", missing={"type": "image", "rate": 1.0})

Modules: `job` (what a config builds: mesh, backbone, classifier, data), `step` (the jitted steps), `loop`
(training in stages), `evaluation` (metrics, tests, re-tests, export), `checkpoint` (orbax), `config`,
`recipes` (the published configs), `cli` (the command lines' shared parts), `writers` (metric logs).
"""
