"""The command lines' shared parts: the default config needs no file of the repository."""

from mora_jax.train import cli, config as config_lib
from tests.helpers import ROOT


def test_the_default_run_is_the_shipped_easy_vqa_mora_config_without_reading_it():
  shipped = config_lib.load(ROOT / "configs" / f"{cli.DEFAULT_NAME}.py")
  assert config_lib.to_json(cli.default_config()) == config_lib.to_json(shipped)
