"""mora_jax: multimodal low-rank adaptation of frozen CLIP models in JAX/Flax."""

__version__ = "0.1.0"
