"""Frozen backbones (Flax NNX CLIP) and their Hugging Face checkpoint mapping."""
