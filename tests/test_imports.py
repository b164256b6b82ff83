"""Importing the adapters, CLIP and the models stays light: none of the data builders' or the trainer's heavy
dependencies (TFDS, TensorFlow, grain, orbax) loads, so a decoding worker, a notebook or a test that only needs a
model pays for jax and flax alone (mora_jax/adapters/__init__.py says what may import what)."""

import subprocess
import sys

from tests.helpers import ROOT

HEAVY = ("tensorflow_datasets", "tensorflow", "grain", "orbax")


def imported_packages(statement: str) -> set[str]:
  """The top-level packages of every module a fresh interpreter loads to run `statement`: `-X importtime` writes
  one line per module on stderr, `import time: <self us> | <cumulative us> | <indented module name>`."""
  result = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], cwd=ROOT, capture_output=True,
                          text=True, check=True)
  rows = [line.split("|") for line in result.stderr.splitlines() if line.startswith("import time:")]
  names = {row[2].strip() for row in rows if len(row) == 3}
  assert "mora_jax.adapters" in names, "no importtime lines parsed: the check would prove nothing"
  return {name.split(".")[0] for name in names}


def test_adapters_clip_and_models_load_no_data_builder_or_trainer_dependency():
  loaded = imported_packages("import mora_jax.adapters, mora_jax.clip, mora_jax.models")
  assert not loaded & set(HEAVY), f"importing the adapters, CLIP and the models loads {sorted(loaded & set(HEAVY))}"
