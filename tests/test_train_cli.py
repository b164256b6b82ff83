"""The command lines: the default config needs no repository file; bad input is one `error:` line."""

import time

import pytest

from mora_jax.train import cli, config as config_lib, job, recipes
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


def test_an_override_without_a_value_is_one_clear_error(tmp_path):
  proc = run_script("train.py", ["--workdir", tmp_path, "--config.optim.lr"], check=False)
  assert_one_line_error(proc.stderr, proc.returncode, "--config.optim.lr needs a value")


def test_no_test_without_export_is_one_clear_error(tmp_path):
  proc = run_script("eval.py", ["--workdir", tmp_path, "--no_test"], check=False)
  assert_one_line_error(proc.stderr, proc.returncode, "--no_test", "--export_hf")


def test_switching_the_adapter_method_keeps_the_shared_fields_and_drops_the_others():
  config = cli.default_config()
  notes = []
  config_lib.apply_overrides(config, [("adapter.alpha", "16"), ("adapter.method", "lora"),
                                      ("adapter.rank", "8")], log=notes.append)
  assert config.adapter.to_dict() == {"method": "lora", "targets": ("q_proj", "v_proj"), "start_layer": 1,
                                      "rank": 8, "dropout": 0.1, "towers": ("vision", "text"), "alpha": 16.0}
  assert len(notes) == 1 and "form" in notes[0] and "variant" in notes[0]
  job.validate(config)
  config_lib.apply_overrides(config, [("adapter.method", "linear")], log=notes.append)
  assert config.adapter.to_dict() == {"method": "linear"}
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'adapter.rank'"):
    config_lib.override(config, "adapter.rank", "4")


# Each is caught by job.validate before the backbone (the embedded one is pre-trained on first use, minutes).
# train.py's own wiring of errors is tested above; these run its main in this process (8 simulated devices).
BAD_CONFIGS = {
    "adapter.rank=0": "rank=0 must be >= 1",
    "adapter.method=vera": "use one of ['mora', 'lora', 'dora', 'moka', 'mmp', 'dcp', 'linear']",
    "dataset=imagenet": "config.dataset='imagenet'",
    "mesh.fsdp=3": "does not cover the 8 devices",
    "accum_steps=3": "batch_size=64 must split into accum_steps=3",
    "missing.type=audio": "missing type 'audio'",
    "epochs=0": "config.epochs=0: must be an integer >= 1",
    "batch_size=0": "config.batch_size=0: must be an integer >= 1",
    "eval.batch_size=0": "config.eval.batch_size=0: must be an integer >= 1",
    "max_steps=-1": "config.max_steps=-1: must be an integer >= 0",
}


def assert_refused_before_any_work(tmp_path, capsys, flags, fragment) -> None:
  """train.py with `flags` exits 2 with one error line holding `fragment`, having built no backbone or LM (in
  tmp_path/cache), prepared no data and made no workdir."""
  cache = tmp_path / "cache"
  code = cli.train_main(["--workdir", str(tmp_path / "w"), f"--config.backbone.cache_dir={cache}",
                         f"--config.data_dir={tmp_path / 'data'}", *flags])
  assert_one_line_error(capsys.readouterr().err, code, fragment)
  assert not cache.exists() and not (tmp_path / "data").exists() and not (tmp_path / "w").exists()


@pytest.mark.parametrize("override", list(BAD_CONFIGS))
def test_a_bad_config_is_reported_before_any_backbone_is_built(tmp_path, override, capsys):
  assert_refused_before_any_work(tmp_path, capsys, [f"--config.{override}"], BAD_CONFIGS[override])


MLLM_BAD_CONFIGS = {
    "stage1.steps=0": "config.stage1.steps=0: must be an integer >= 1",
    "eval.test_samples=-1": "config.eval.test_samples=-1: must be an integer >= 0",
    "epochs=0": "config.epochs=0: must be an integer >= 1",
    "missing.type=audio": "missing type 'audio'",
    "adapter.rank=0": "rank=0 must be >= 1",
    "projector=mlp3": "config.projector='mlp3': use one of",
    "image_tokens=cls": "config.image_tokens='cls': use one of",
    "stage1.data=captionz": "config.stage1.data='captionz': use one of",
    "questions=count": "config.questions='count': use one of",
}


@pytest.mark.parametrize("override", list(MLLM_BAD_CONFIGS))
def test_a_bad_mllm_config_is_reported_before_any_model_is_built(tmp_path, override, capsys):
  flags = ["--config", str(ROOT / "configs" / "easy_vqa_mllm_moka.py"), f"--config.lm.cache_dir={tmp_path / 'cache'}",
           f"--config.{override}"]
  assert_refused_before_any_work(tmp_path, capsys, flags, MLLM_BAD_CONFIGS[override])


@pytest.mark.parametrize("override", ["adapter.alpha=800", "adapter.method=lora", "head.type=mlp", "seed=1"])
def test_eval_refuses_an_override_that_changes_the_trained_model(tmp_path, override, capsys):
  code = cli.eval_main(["--workdir", str(tmp_path / "run"), f"--config.{override}"])
  assert_one_line_error(capsys.readouterr().err, code, f"--config.{override.split('=')[0]}: eval.py re-tests")


@pytest.mark.parametrize("flag", ["--output", "--export_hf", "--export_peft"])
def test_eval_checks_where_it_writes_before_testing(tmp_path, flag, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  code = cli.eval_main(["--workdir", str(tmp_path / "no_run"), flag, str(blocker / "out")])
  assert_one_line_error(capsys.readouterr().err, code, f"pass another {flag}")
  assert not (tmp_path / "no_run").exists()  # refused before the run was even looked for


@pytest.mark.parametrize("manual_dir", ["absent", "unset"])
def test_food101_without_its_manual_dir_fails_before_downloading_the_backbone(tmp_path, manual_dir):
  hub, raw = tmp_path / "hf_home", tmp_path / "raw"
  proc = run_script("train.py", ["--config", ROOT / "configs" / "food101_mora.py", "--workdir", tmp_path / "w",
                                 f"--config.data_dir={tmp_path / 'data'}",
                                 f"--config.manual_dir={raw if manual_dir == 'absent' else ''}"], check=False,
                    env_extra={"HF_HOME": str(hub)})
  assert_one_line_error(proc.stderr, proc.returncode, str(raw) if manual_dir == "absent" else "no manual_dir",
                        "MANUAL_DOWNLOAD_INSTRUCTIONS")
  assert not hub.exists()


@pytest.mark.parametrize("script,expected", [
    ("train.py", ["--config.KEY=VALUE", "adapter.method", "optim.lr", "example:"]),
    ("eval.py", ["--missing.type", "--config.KEY=VALUE", "--export_hf", "--no_test", "examples:"])])
def test_help_lists_the_overrides_quickly_and_quietly(script, expected):
  start = time.perf_counter()
  proc = run_script(script, ["--help"])
  seconds = time.perf_counter() - start
  print(f"{script} --help: {seconds:.2f} s")  # measured 0.1-0.2 s here: no jax, transformers or tfds import
  assert proc.stderr == ""
  for text in expected:
    assert text in proc.stdout
  assert seconds < 4, f"{script} --help took {seconds:.1f} s (budget 2 s; 4 s allows a loaded machine)"


RECIPE = "from mora_jax.train import recipes\n\ndef get_config():\n  c = recipes.{}\n  {}\n  return c\n"
BAD_CONFIG_FILES = {  # file name: (its text, a fragment of the error)
    "syntax.py": ("def get_config(:\n", "SyntaxError: invalid syntax"),
    "raises.py": ("def get_config():\n  raise RuntimeError('no data here')\n", "RuntimeError: no data here"),
    "bad_import.py": ("import not_a_module\n", "ModuleNotFoundError: No module named 'not_a_module'"),
    "a_dict.py": ("def get_config():\n  return {'seed': 1}\n", "get_config() returned dict, not an ml_collections"),
    "none.py": ("def get_config():\n  return None\n", "get_config() returned NoneType"),
    "wrong_type.py": (RECIPE.format("get('easy_vqa', 'mora')", "c.optim.lr = 'fast'"), "TypeError: Could not override"),
    "no_seed.py": (RECIPE.format("get('easy_vqa', 'mora')", "del c.seed"), "lacks the key(s) seed"),
    "mllm_no_lr.py": (RECIPE.format("mllm('moka')", "del c.stage1.lr"), "lacks the key(s) stage1.lr"),
    "config.yaml": ("seed: 1\n", "is not a .py file"),
    "a_folder": (None, "is a folder"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIG_FILES))
def test_a_broken_config_file_is_one_error_naming_it(tmp_path, name, capsys):
  text, fragment = BAD_CONFIG_FILES[name]
  path = tmp_path / name
  if text is None:
    path.mkdir()
  else:
    path.write_text(text)
  code = cli.train_main(["--config", str(path), "--workdir", str(tmp_path / "w")])
  assert_one_line_error(capsys.readouterr().err, code, f"config file {path}", fragment)
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--config.data_dir", "--config.max_steps=2"], "--config.data_dir needs a value"),
    (["--confg.epochs=2"], "did you mean --config.epochs=2?"),
    (["--workdir", ""], "argument --workdir: empty path"),
    (["--config", ""], "argument --config: empty path"),
    (["--config.adapter=4"], "adapter is a section; set adapter.KEY"),
    (["--config.adapter.rank.foo=1"], "adapter.rank is a value, not a section"),
    (["--config.manifest.split_fractions=abc,0.1,0.1"], "manifest.split_fractions: item 'abc' is not a float")])
def test_a_malformed_override_or_flag_is_one_error(tmp_path, args, fragment, capsys):
  code = cli.train_main(["--workdir", str(tmp_path / "w"), *args])
  assert_one_line_error(capsys.readouterr().err, code, fragment)
  assert not (tmp_path / "w").exists() and not list(tmp_path.iterdir())


def test_an_override_value_is_the_next_arg_only_when_it_is_not_a_flag():
  overrides, rest = cli.split_overrides(["--config.a", "-1", "--config.b=", "--config.c=--x", "--workdir", "w"],
                                        ["config"])
  assert overrides == [("config", "a", "-1"), ("config", "b", ""), ("config", "c", "--x")]
  assert rest == ["--workdir", "w"]


def test_a_tuple_override_takes_the_type_of_its_items():
  config = cli.default_config()
  config_lib.override(config, "manifest.split_fractions", "1,0,0")
  config_lib.override(config, "adapter.targets", "k_proj")
  assert config.manifest.split_fractions == (1.0, 0.0, 0.0) and config.adapter.targets == ("k_proj",)


@pytest.mark.parametrize("args,fragment", [
    (["--mising.type=image"], "did you mean --missing.type=image?"),
    (["--config.eval.batchsize=16"], "unknown config key 'eval.batchsize'. Did you mean eval.batch_size?"),
    (["--config.eval.test_samples=16"], "unknown config key 'eval.test_samples'"),  # an MLLM run's key
    (["--output", ""], "argument --output: empty path"),
    (["--export_hf", "", "--no_test"], "argument --export_hf: empty path"),
    (["--export_peft", "", "--no_test"], "argument --export_peft: empty path")])
def test_eval_refuses_a_malformed_flag_or_unknown_key_in_one_line(tmp_path, args, fragment, capsys):
  code = cli.eval_main(["--workdir", str(tmp_path / "run"), *args])
  assert_one_line_error(capsys.readouterr().err, code, fragment)


def has_key(config, key: str) -> bool:
  try:
    config_lib.locate(config, key)
  except config_lib.ConfigError:
    return False
  return True


def test_eval_may_change_each_listed_key_in_the_family_that_has_it():
  configs = (cli.default_config(), recipes.mllm("moka"))
  for key in cli.EVAL_OVERRIDABLE:
    families = [config for config in configs if has_key(config, key)]
    assert families, f"{key} is a key of no config"
    cli.check_eval_overrides([(key, "1")], families[0])
  assert "manifest.path" in cli.EVAL_OVERRIDABLE  # a moved manifest's error says to set it


@pytest.mark.parametrize("flag,where,present", [
    ("--export_hf", "run", None), ("--export_peft", "run", None), ("--export_hf", ".", None),
    ("--export_hf", "out", "config.json"), ("--export_peft", "out", "adapter_config.json"),
    ("--export_peft", "out", "head.safetensors")])
def test_eval_refuses_an_export_that_would_overwrite_files(tmp_path, flag, where, present, capsys):
  run = tmp_path / "run"
  run.mkdir()
  saved = config_lib.to_json(cli.default_config())
  (run / "config.json").write_text(saved)
  out = tmp_path / where
  if present:
    out.mkdir()
    (out / present).write_text("{}")
  code = cli.eval_main(["--workdir", str(run), flag, str(out), "--no_test"])
  assert_one_line_error(capsys.readouterr().err, code, *(
      [f"already holds {present}", "choose an empty or new folder"] if present else ["is or holds the run's workdir"]))
  assert (run / "config.json").read_text() == saved
