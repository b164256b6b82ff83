"""TFDS builders (no TensorFlow needed: ArrayRecord files, images stored as encoded bytes)."""
