"""The backbone FSDP-sharded over 8 simulated CPU devices computes the same features as on one device."""

import jax
import numpy as np
from jax.sharding import PartitionSpec

from mora_jax import clip, sharding
from tests import helpers


def test_fsdp_sharded_backbone_same_features(tmp_path):
  assert jax.device_count() == 8, "conftest.py sets 8 simulated CPU devices"
  cfg = helpers.tiny_config()
  path = clip.save_pretrained(clip.init(cfg, seed=2), tmp_path)
  mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
  sharded = clip.from_pretrained(path, mesh=mesh, rules=sharding.FSDP_RULES)
  single = clip.from_pretrained(path)

  fc1 = sharded.vision_model.encoder.layers[0].mlp.fc1.kernel[...]
  assert fc1.sharding.spec == PartitionSpec("fsdp", None)  # ("embed", "mlp"): width split over 4 devices
  assert len(fc1.sharding.device_set) == 8
  assert fc1.addressable_shards[0].data.shape == (32 // 4, 64)
  q = sharded.text_model.encoder.layers[1].self_attn.q_proj
  assert q.kernel[...].sharding.spec == PartitionSpec("fsdp", None)
  assert q.bias[...].sharding.spec == PartitionSpec(None)  # "joined_kv" has no rule: replicated
  assert sharded.logit_scale[...].sharding.spec == PartitionSpec()

  pixels, ids, mask = helpers.random_inputs(cfg, batch=4)
  image_sharded, text_sharded = helpers.jit_features(sharded)
  image_single, text_single = helpers.jit_features(single)
  # Sharded matmuls add partial sums in another order: float32 rounding only.
  np.testing.assert_allclose(image_sharded(pixels), image_single(pixels), atol=1e-5, rtol=0)
  np.testing.assert_allclose(text_sharded(ids, mask), text_single(ids, mask), atol=1e-5, rtol=0)


def test_shard_module_moves_a_built_model():
  mesh = sharding.make_mesh((1, 8), ("data", "fsdp"))
  model = clip.init(helpers.tiny_config())
  sharding.shard_module(model, mesh, sharding.FSDP_RULES)
  kernel = model.text_projection.kernel[...]  # ("embed", "proj") = (32, 16)
  assert kernel.sharding.spec == PartitionSpec("fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (4, 16)


def test_indivisible_dimension_stays_replicated():
  mesh = sharding.make_mesh((1, 8), ("data", "fsdp"))
  assert sharding.logical_to_spec(("embed", "mlp"), (12, 64), mesh, sharding.FSDP_RULES) == PartitionSpec(None, None)
  assert sharding.logical_to_spec(("embed", "mlp"), (16, 64), mesh, sharding.FSDP_RULES) == PartitionSpec("fsdp", None)
