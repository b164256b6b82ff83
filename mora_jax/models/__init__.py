"""Frozen backbones in Flax NNX and their Hugging Face checkpoint mapping.

- config.py, modeling.py: CLIP (architecture configs and presets; the towers, whose projections are `Linear`s
  called as proj(x, call)); hf.py: CLIP checkpoints <-> Hugging Face (also the public `mora_jax.clip`).
- llama.py: a Llama-family decoder LM (KV cache, decoding); llama_hf.py: its Hugging Face checkpoints.

Imports: besides each other the models import only mora_jax.sharding (logical-axis rules), never mora_jax.adapters,
mora_jax.train or mora_jax.data: they are the leaves the adapters (which replace their projections) and the
trainer build on.
"""
