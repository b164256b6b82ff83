"""What provides a frozen backbone: a Hugging Face CLIP checkpoint (local or from the Hub), a randomly
initialised preset, or the project's small CLIP pre-trained on easy-VQA (`embedded`, built by `pretrain`) with
its tokenizer and image preprocessing. Imports neither `mora_jax.adapters` nor `mora_jax.train`.

    from mora_jax import backbones
    backbone = backbones.load(config.backbone, max_length=77, data_dir="data", mesh=mesh, rules=rules)
    backbone.model, backbone.tokenizer, backbone.image_processing, backbone.identity
"""

from mora_jax.backbones import embedded, pretrain
from mora_jax.backbones.backbone import (Backbone, compute_dtype, image_processing, load, storage_dtype,
                                         weights_hash)

__all__ = ["Backbone", "compute_dtype", "embedded", "image_processing", "load", "pretrain", "storage_dtype",
           "weights_hash"]
