"""config.init_from: a fresh run starts from another run's adapters and head, or from a PEFT directory; a
resumed run keeps its own; a different adapter is refused."""

import json

import jax
import numpy as np
import pytest

from mora_jax import sharding
from mora_jax.train import checkpoint, cli, config as config_lib, evaluation, init_from, loop
from tests.helpers import (ROOT, assert_one_line_error, final_state, memes_config, memes_overrides,
                           saved_checkpoint)


def flat(tree) -> dict[str, np.ndarray]:
  """path -> numpy leaf, for nnx.State trees and the plain dicts a checkpoint restores to alike."""
  key = lambda entry: str(getattr(entry, "key", getattr(entry, "name", entry)))  # noqa: E731
  return {"/".join(map(key, path)): np.asarray(sharding.replicated_value(leaf) if isinstance(leaf, jax.Array)
                                               else leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_equal(a, b):
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def start(config, workdir):
  """A started run's trained parameters and its init_from record; the run is closed."""
  run = loop.start(config, workdir)
  run.ckpt.close()
  run.writer.close()
  return run.state["params"], run.record.init_from


def test_init_from_a_finished_run_restores_its_adapters_and_head_exactly(memes, one_device_run, tmp_path):
  step, source = final_state(one_device_run)
  params, record = start(memes_config(memes, {"init_from": one_device_run}), tmp_path / "run")
  assert record == {"source": str(one_device_run), "kind": "run", "step": step, "head": True}
  assert_trees_equal(params, source["params"])  # bitwise: adapters and head (same classes, same head)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["init_from"] == str(one_device_run)

  # Another head type: the adapters still come, the head starts fresh.
  params, record = start(memes_config(memes, {"init_from": one_device_run / "checkpoints" / str(step),
                                              "head.type": "mlp"}), tmp_path / "mlp")
  assert record["head"] is False
  assert_trees_equal(params["adapter"], source["params"]["adapter"])


def test_eval_json_records_it_and_a_resumed_run_does_not_re_apply_it(memes, one_device_run, tmp_path):
  config = memes_config(memes, {"init_from": one_device_run, "max_steps": 1})
  results = loop.train(config, tmp_path / "run")
  source_step, source = final_state(one_device_run)
  assert results["init_from"] == {"source": str(one_device_run), "kind": "run", "step": source_step, "head": True}
  assert json.loads((tmp_path / "run" / "eval.json").read_text())["init_from"] == results["init_from"]
  _, trained = final_state(tmp_path / "run")
  params, record = start(config, tmp_path / "run")  # resumes its own step-1 checkpoint
  assert_trees_equal(params, trained["params"])
  assert record == results["init_from"]  # the record of its first start, from its checkpoint
  moved, initial = flat(params), flat(source["params"])
  assert any(not np.array_equal(moved[name], initial[name]) for name in moved)  # trained since init_from


def test_init_from_a_peft_export_restores_adapters_and_head(memes, one_device_run, tmp_path):
  lora = config_lib.load(ROOT / "configs" / "hateful_memes_lora.py")
  config_lib.apply_overrides(lora, [tuple(flag[len("--config."):].split("=", 1)) for flag in memes_overrides(memes)])
  # A LoRA run's parameters moved off their init, exported as eval.py --export_peft does.
  run = loop.start(lora, tmp_path / "source")
  trained = jax.tree.map(lambda x: x + 0.5, run.state["params"])
  run.ckpt.close()
  run.writer.close()
  evaluation.export_peft_adapter(run.task, trained, tmp_path / "peft")
  lora.init_from = str(tmp_path / "peft")
  params, record = start(lora, tmp_path / "run")
  assert record == {"source": str(tmp_path / "peft"), "kind": "peft", "step": None, "head": True}
  assert_trees_equal(params, trained)  # bitwise: float32 through safetensors (the factors transposed twice)


def test_export_peft_refuses_mora_before_evaluating(one_device_run, tmp_path, capsys):
  code = cli.eval_main(["--workdir", str(one_device_run), "--export_peft", str(tmp_path / "peft")])
  assert_one_line_error(capsys.readouterr().err, code, "no PEFT type", "--export_hf")
  assert not (tmp_path / "peft").exists()


def test_a_different_adapter_is_refused_in_one_line_before_any_work(memes, one_device_run, tmp_path, capsys):
  flags = memes_overrides(memes, init_from=one_device_run, **{"adapter.rank": 4, "data_dir": tmp_path / "data"})
  code = cli.train_main(["--config", str(ROOT / "configs" / "hateful_memes_mora.py"), "--workdir",
                         str(tmp_path / "run"), *flags])
  assert_one_line_error(capsys.readouterr().err, code, "init_from", "adapter.rank: 8 -> 4")
  assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()  # no data prepared, no folder made


def test_parameters_of_other_shapes_are_refused():
  target = {"adapter": {"lora_A": jax.ShapeDtypeStruct((32, 4), np.float32)}}
  init_from.check_shapes({"adapter": {"lora_A": np.zeros((32, 4), np.float32)}}, target, "ckpt/3")
  with pytest.raises(ValueError, match=r"\['lora_A'\] \(64, 4\) \(this run: \(32, 4\)\)"):
    init_from.check_shapes({"adapter": {"lora_A": np.zeros((64, 4), np.float32)}}, target, "ckpt/3")


@pytest.mark.parametrize("damaged", [True, False], ids=["damaged", "other shapes"])
def test_a_checkpoint_that_does_not_restore_is_one_short_line_saying_why(tmp_path, damaged):
  step_dir = saved_checkpoint(tmp_path / "checkpoints")
  file = max((step_dir / "state" / "d").iterdir(), key=lambda f: f.stat().st_size)  # the arrays' data
  if damaged:
    with open(file, "r+b") as f:
      f.truncate(file.stat().st_size // 2)
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True)
  # With a sharding, as a run's target has: orbax then refuses other shapes (without, it restores the saved ones).
  target = {"w": jax.ShapeDtypeStruct((2,) if damaged else (3,), np.float32,
                                      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  with pytest.raises(ValueError) as error:
    init_from.restore_params(ckpt, [1], target, "runs/x")
  ckpt.close()
  message = str(error.value)
  assert "\n" not in message and len(message.replace(str(tmp_path), "")) < 300, message  # no tensorstore spec
  if damaged:
    assert message.startswith(f"config.init_from='runs/x': no checkpoint in {tmp_path / 'checkpoints'} restores "
                              f"(step 1: {file}). Nothing was moved"), message
    assert "architecture" not in message
  else:
    assert message == (f"config.init_from='runs/x': the parameters of {tmp_path / 'checkpoints'} have other shapes "
                       "than this run's (one is (2,) where this run's is (3,)). Was it trained on another backbone "
                       "architecture? init_from needs the same one.")
