"""The command lines: the default config needs no repository file; bad input is one `error:` line."""

from mora_jax.train import cli, config as config_lib
from tests.helpers import CONFIG, ROOT, assert_one_line_error, memes_overrides, run_script


def test_the_default_run_is_the_shipped_easy_vqa_mora_config_without_reading_it():
  shipped = config_lib.load(ROOT / "configs" / f"{cli.DEFAULT_NAME}.py")
  assert config_lib.to_json(cli.default_config()) == config_lib.to_json(shipped)


def test_unknown_config_key_is_one_clear_error(tmp_path):
  proc = run_script("train.py", ["--config", CONFIG, "--workdir", tmp_path, "--config.optim.lrr=1"], check=False)
  assert_one_line_error(proc.stderr, proc.returncode, "unknown config key 'optim.lrr'", "Did you mean optim.lr?")


def test_missing_data_dir_is_one_clear_error(memes, tmp_path):
  missing = tmp_path / "nowhere"
  proc = run_script("train.py", ["--config", CONFIG, "--workdir", tmp_path / "w",
                                 *memes_overrides(memes, manual_dir=missing)], check=False)
  assert_one_line_error(proc.stderr, proc.returncode, str(missing), "MANUAL_DOWNLOAD_INSTRUCTIONS")
  proc = run_script("train.py", ["--config", CONFIG, "--workdir", tmp_path / "w",
                                 *memes_overrides(memes, manual_dir="", data_dir=missing)], check=False)
  assert_one_line_error(proc.stderr, proc.returncode, "MANUAL_DOWNLOAD_INSTRUCTIONS")
