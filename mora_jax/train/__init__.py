"""Training and evaluation of both model families: one loop over a task's stages, the jitted steps over a device
mesh, orbax checkpoints, configs and the command lines.

    from mora_jax.train import config, evaluation, loop
    cfg = config.load("configs/food101_mora.py")       # or configs/easy_vqa_mllm_moka.py: the same call
    results = loop.train(cfg, "runs/food101_mora")   # eval.json, metrics.jsonl, tensorboard/ in the workdir
    again = evaluation.evaluate_run("runs/food101_mora", missing={"type": "image", "rate": 1.0})

What lives where:
- loop.py: the one training loop (stages started and resumed, epochs, validation, SIGTERM, the test); tasks.py:
  what the loop needs of a task (`Task`), a `Stage`, and the task of a config; classification.py: the CLIP
  classifier's task; answering.py: the multimodal LLM's (two stages; eval.py on its workdirs).
- step.py: the jitted train and evaluation steps (a task's loss, gradient accumulation, padding masks);
  checkpoint.py: orbax checkpoints (newest intact, damaged ones moved aside, config/backbone/data checks).
- job.py: what a classifier config builds (typed `Settings` from `validate`, mesh, backbone, classifier, data);
  prefix_cache.py: the frozen layers' activations computed once; evaluation.py: metrics, per-scenario tests,
  re-tests; init_from.py, export.py: another run's or a PEFT adapter's weights in, merged weights out.
- config.py (files and overrides), recipes.py (the published configs), cli.py (train.py and eval.py),
  writers.py (metrics.jsonl, TensorBoard).

Imports: train is the top layer: it imports adapters, backbones, data, models, sharding and console; nothing below
imports it. Within it, loop imports tasks, and the two task modules import what only they use.
"""
