"""python -m mora_jax.reproduce: every table's data, the rendering of ours beside the published numbers, and the
machinery end to end on fixture data in the real formats (Hateful Memes and Food-101 as the authors' Arrow files
with their missing-table files, MM-IMDb in its raw layout), a random tiny CLIP and 2-step runs: a table killed
mid-run resumes without redoing finished runs, an absent dataset is skipped with one line, the dry run lists
every run with this host's measured time, re-tests fill the cross-scenario cells; the MLLM table on a random tiny
CLIP vision tower and Llama."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mora_jax.data import vqa
from mora_jax.reproduce import cli, command, render, runs, tables, throughput
from mora_jax.reproduce.tables import Cell, Measure, Source, Table, Training
from mora_jax.train import config as config_lib
from tests.helpers import assert_one_line_error, coloured_png, tiny_lm, write_arrow

# Every run of the end-to-end tests: a random tiny CLIP, 2 steps of 8 samples, a checkpoint every step.
TINY = (("backbone.path", ""), ("backbone.random_preset", "tiny"), ("adapter.start_layer", "1"),
        ("preprocessing.max_length", "24"), ("batch_size", "8"), ("eval.batch_size", "8"), ("epochs", "1"),
        ("max_steps", "2"), ("data_threads", "1"), ("log_every_steps", "1"), ("checkpoint.every_steps", "1"))


def test_every_table_is_well_formed_and_every_run_config_builds():
  options = runs.Options(workdir=Path("unused"))
  for name, table in tables.TABLES.items():
    assert name == table.name
    keys = [(c.row, c.column) for c in table.cells]
    assert len(keys) == len(set(keys)), name
    not_run = {row for row, _ in table.not_run}
    assert all(bool(c.measures) == (c.row not in not_run) for c in table.cells), name  # a reason per cell not run
    assert all((c.published is None) == (c.source is None) for c in table.cells), name
    for training in table.trainings:  # every override names a key of the recipe, with a value it takes
      config = runs.config_of(training, table.seeds[0], options, build_backbone=False)
      assert (config.missing.type, config.missing.rate) == (training.type, training.rate)
    folders = [(t.dataset, t.name) for t in table.trainings]
    assert len(folders) == len(set(folders)), name  # distinct configs, distinct folders
  main = tables.TABLES["mora-main"]
  assert {len(c.measures) for c in main.cells} == {3}  # the mean over the three missing types
  assert len(tables.TABLES["easy-vqa"].trainings) == len(tables.EASY_VQA_RUNS)


def test_the_mllm_table_is_the_mllm_recipes_in_their_own_folders():
  options = runs.Options(workdir=Path("unused"), cache_dir="/somewhere/cache")
  table = tables.TABLES["easy-vqa-mllm"]
  assert len(table.trainings) == len(tables.MLLM_RUNS) and table.seeds == (42, 43, 44)
  assert table.columns == [*tables.EASY_VQA_SCENARIOS.values(), "yes/no complete", "color complete", "shape complete"]
  assert {m.metric for c in table.cells for m in c.measures} == {
      "", "per_question_type.yes/no", "per_question_type.color", "per_question_type.shape"}
  easy_vqa = {t.name for t in tables.TABLES["easy-vqa"].trainings}
  assert all(t.name.startswith("mllm-") and t.name not in easy_vqa for t in table.trainings)
  assert Training("easy_vqa", "moka").name == "moka-both70"  # a classifier run's folder as it always was
  for training in table.trainings:
    config = runs.config_of(training, 43, options)
    assert config.task == "mllm" and config.seed == 43 and config.backbone.path == "embedded"
    assert config.backbone.cache_dir == config.lm.cache_dir == "/somewhere/cache"
    runs.validate(config)
  match = tables.TABLES["easy-vqa-match"]
  assert match.columns == ["complete", "text missing", "image missing", *(f"{t} complete" for t in vqa.MATCH_TYPES)]
  assert {(runs.config_of(t, 42, options).questions, t.rate) for t in match.trainings} == {("match", 0.0)}
  assert not {t.name for t in match.trainings} & {t.name for t in table.trainings}
  linear = runs.config_of(Training("easy_vqa", "moka", overrides=(("projector", "linear"),), task="mllm"), 42, options)
  lambda0 = runs.config_of(Training("easy_vqa", "moka_lambda0", task="mllm"), 42, options)
  assert linear.projector == "linear" and lambda0.adapter.lam == 0.0
  assert "lm.cache_dir" in runs.HOST_KEYS
  with pytest.raises(ValueError, match="no dataset or study backbone"):
    Training("easy_vqa", "moka", backbone=tables.ALIGNED, task="mllm")
  with pytest.raises(ValueError, match="no re-test"):
    Table("t", "t", (Cell("r", "c", (Measure(table.trainings[0], retest=("image", 0.9)),)),))


def test_a_dotted_metric_reads_a_nested_result(tmp_path):
  options = runs.Options(workdir=tmp_path)
  training = Training("easy_vqa", "moka", task="mllm")
  directory = runs.run_dir(options, training, 42)
  directory.mkdir(parents=True)
  complete = {"exact_match": 0.5, "samples": 8, "per_question_type": {"yes/no": 0.25, "color": 0.75}}
  (directory / "eval.json").write_text(json.dumps({"metric": "exact_match", "test": {"complete": complete}}))
  assert runs.value(options, Measure(training, "complete"), 42) == 50.0
  assert runs.value(options, Measure(training, "complete", "per_question_type.color"), 42) == 75.0
  assert runs.value(options, Measure(training, "complete", "per_question_type.yes/no"), 42) == 25.0
  assert runs.value(options, Measure(training, "complete"), 43) is None  # not run
  with pytest.raises(ValueError, match="has no 'per_question_type.shape' in its 'complete' test results"):
    runs.value(options, Measure(training, "complete", "per_question_type.shape"), 42)


def fake_result(options, training, seed, value, metric="accuracy"):
  directory = runs.run_dir(options, training, seed)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "eval.json").write_text(json.dumps({"metric": metric, "test": {"mix": {metric: value}}}))


def test_cells_average_their_measures_per_seed_then_report_mean_std_and_the_difference(tmp_path):
  options = runs.Options(workdir=tmp_path)
  text, image = Training("hateful_memes", "mora", "text"), Training("hateful_memes", "mora", "image")
  source = Source("paper", "Table 1")
  table = Table("t", "a test table", (
      Cell("MoRA", "mean of two", (Measure(text), Measure(image)), 60.0, source),
      Cell("MoRA", "text only", (Measure(text),), 50.0, source)), seeds=(1, 2, 3))
  for seed, (a, b) in {1: (0.5, 0.7), 2: (0.6, 0.8)}.items():
    fake_result(options, text, seed, a, "auroc")
    fake_result(options, image, seed, b, "auroc")
  fake_result(options, text, 3, 0.55, "auroc")  # seed 3's image run is not done: the mean cell has 2 seeds
  results = render.collect(table, options, table.seeds)
  mean_cell, text_cell = results
  assert mean_cell.per_seed == pytest.approx({1: 60.0, 2: 70.0})
  assert (mean_cell.mean, mean_cell.std, mean_cell.difference) == pytest.approx((65.0, 7.0710678, 5.0))
  assert text_cell.mean == pytest.approx(55.0) and text_cell.difference == pytest.approx(5.0)
  render.write(table, results, tmp_path / "out", "the command", ["dataset x: skipped"])
  markdown = (tmp_path / "out" / "t.md").read_text()
  assert "| BitFit |" not in markdown  # not in this table
  assert "| MoRA | 65.00 ± 7.07 [2/3] (60.00, +5.00) | 55.00 ± 5.00 (50.00, +5.00) |" in markdown
  assert "paper, Table 1, test" in markdown and "dataset x: skipped" in markdown and "`the command`" in markdown
  rows = list(csv.DictReader((tmp_path / "out" / "t.csv").open()))
  assert rows[0]["ours_mean"] == "65.0000" and rows[0]["seeds_done"] == "2" and rows[0]["per_seed"] == (
      "1:60.0000;2:70.0000")
  assert (tmp_path / "out" / "t.png").stat().st_size > 0


def test_a_finished_run_of_another_config_stops_the_table_before_any_run(tmp_path):
  options = runs.Options(workdir=tmp_path / "runs")
  table = tables.TABLES["easy-vqa"].restricted(["MoRA", "LoRA"])
  lora = Training("easy_vqa", "lora", backbone=tables.ALIGNED)
  other = runs.config_of(lora, 1, runs.Options(workdir=options.workdir, overrides=(("optim.lr", "0.5"),)),
                         build_backbone=False)
  runs.run_dir(options, lora, 1).mkdir(parents=True)
  (runs.run_dir(options, lora, 1) / "config.json").write_text(config_lib.to_json(other))
  fake_result(options, lora, 1, 0.5)  # finished, at another lr: never a number of this table
  with pytest.raises(ValueError, match=r"lora-backbone_aligned-both70/seed1 holds a run of another config"):
    command.run_table(table, options, (0, 1), tmp_path / "out", "cmd")
  assert not (tmp_path / "out").exists() and not runs.run_dir(options, Training(
      "easy_vqa", "mora", backbone=tables.ALIGNED), 0).exists()  # stopped before the first run


def test_the_published_numbers_are_the_papers(tmp_path):
  """Pinned against the papers' tables as the issue lists them (rows, then the datasets or columns in order)."""
  def published(table, rows):
    t = tables.TABLES[table]
    return {row: [c.published for c in t.cells if c.row == row] for row in rows}

  assert published("mora-peft", ["MoRA", "DoRA", "LoRA", "DCP", "BitFit"]) == {
      "MoRA": [52.97, 83.77, 70.15], "DoRA": [51.89, 82.34, 68.28], "LoRA": [51.35, 82.14, 67.97],
      "DCP": [51.42, 81.87, 66.08], "BitFit": [48.57, 79.38, 64.10]}
  assert published("mora-main", ["MoRA", "DCP"]) == {
      "MoRA": [56.04, 51.96, 86.91, 82.09, 70.61, 68.56], "DCP": [52.92, 49.84, 85.49, 80.30, 64.27, 64.24]}
  assert published("dcp-table4", ["DCP", "MMP"]) == {
      "DCP": [48.52, 53.14, 51.42, 78.87, 87.32, 81.87, 62.82, 64.12, 66.08],
      "MMP": [45.64, 50.52, 48.12, 76.52, 85.64, 79.12, 61.12, 63.24, 65.04]}
  assert published("mora-ablation", ["without the specific path", "without the Gram coupling",
                                     "with a learned Gram matrix"]) == {
      "without the specific path": [51.18, 81.32, 68.71], "without the Gram coupling": [50.41, 80.31, 68.19],
      "with a learned Gram matrix": [52.25, 83.37, 69.12]}
  text_missing = [c for c in tables.TABLES["dcp-table4"].cells if c.column == "Food-101, text missing"]
  assert {m.training.type for c in text_missing for m in c.measures} == {"text"}


def test_the_estimate_is_the_formula_of_its_docstring(tmp_path):
  config = runs.config_of(Training("hateful_memes", "mora"), 42, runs.Options(workdir=tmp_path, data_dir="none"),
                          build_backbone=False)
  n_train, n_val, n_test, classes, multi_label = throughput.SIZES["hateful_memes"]
  measured = {"full": 2.0, "cached": 10.0, "prefix_bytes": 1000, "pixel_bytes": 7}
  got = throughput.estimate(config, measured)
  epochs = config.epochs
  assert got.seconds == pytest.approx((n_train + n_val) / 2.0 + epochs * (n_train + n_val) / 10.0 + 2 * n_test / 2.0)
  assert got.retest_seconds == pytest.approx(2 * n_test / 2.0)
  trained = throughput.trainable_parameters(config, classes, multi_label)
  assert got.checkpoint_bytes == (config.checkpoint.keep + 1) * trained * 3 * 4  # latest + best, params + 2 moments
  assert got.prefix_cache_disk_bytes == 0  # 10 MB: in host memory
  config.prefix_cache_memory_gb = 0.001
  assert throughput.estimate(config, measured).prefix_cache_disk_bytes == 1000 * (n_train + 1 + n_val + 1)
  config.prefix_cache = "off"  # every epoch at the full rate, images read every epoch from the pixel store
  got = throughput.estimate(config, measured)
  assert got.seconds == pytest.approx(epochs * (n_train + n_val) / 2.0 + 2 * n_test / 2.0)
  assert got.pixel_store_bytes == 7 * (n_train + n_val + n_test)


def test_rows_not_run_keep_their_published_numbers_and_say_why(tmp_path):
  table = tables.TABLES["mora-peft"].restricted(["MoRA", "BitFit"])
  results = render.collect(table, runs.Options(workdir=tmp_path), table.seeds)
  render.write(table, results, tmp_path, "cmd")
  markdown = (tmp_path / "mora-peft.md").read_text()
  assert "| BitFit | not run (48.57) | not run (79.38) | not run (64.10) |" in markdown
  assert "- BitFit: not run: BitFit (training the backbone's biases) is not a method of this library." in markdown
  rows = {(r["row"], r["column"]): r for r in csv.DictReader((tmp_path / "mora-peft.csv").open())}
  assert rows["BitFit", "Food-101"]["status"] == "not run" and rows["BitFit", "Food-101"]["published"] == "79.3800"
  assert rows["MoRA", "Food-101"]["status"] == "" and rows["MoRA", "Food-101"]["ours_mean"] == ""


def test_a_run_folder_of_another_config_is_refused_not_reused(tmp_path):
  options = runs.Options(workdir=tmp_path)
  training = Training("hateful_memes", "mora")
  directory = runs.run_dir(options, training, 42)
  directory.mkdir(parents=True)
  config = runs.config_of(training, 42, options, build_backbone=False)
  (directory / "config.json").write_text(config_lib.to_json(config))
  runs.check_same_run(directory, config)  # the same
  moved = runs.config_of(training, 42, runs.Options(workdir=tmp_path, data_dir="elsewhere"), build_backbone=False)
  runs.check_same_run(directory, moved)  # where the data lives is not what the run computed
  changed = runs.config_of(training, 42, runs.Options(workdir=tmp_path, overrides=(("optim.lr", "0.5"),)),
                           build_backbone=False)
  with pytest.raises(ValueError, match=r"seed42 holds a run of another config \(optim.lr: 0.01 -> 0.5\)"):
    runs.check_same_run(directory, changed)


def write_arrow_dataset(root, tables_dir, dataset, rows=16, classes=2, seed=0):
  """The authors' {train,val,test}.arrow files of `dataset` and, with torch, their missing tables (.pt under
  their names, both 0.7); labels visible in the image colour."""
  rng = np.random.RandomState(seed)
  root.mkdir(parents=True)
  alias = {"hateful_memes": "hatememes", "upmc_food101": "food101"}[dataset]
  for split in ("train", "val", "test"):
    labels = [int(rng.randint(classes)) for _ in range(rows)]
    write_arrow(root / f"{split}.arrow", {"image": [coloured_png(rng, [label % 3]) for label in labels],
                                          "text": [[f"{split} text {label}"] for label in labels], "label": labels})
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:  # the 3.11 leg has no torch: the protocol's generated tables instead
    return False
  tables_dir.mkdir(parents=True, exist_ok=True)
  for split in ("train", "val", "test"):
    torch.save(torch.tensor(rng.choice([0, 1, 2], rows).astype(np.float32)),
               tables_dir / f"{alias}_split{split}_missing_both_0.7.pt")
  return True


class Killed(Exception):
  pass


def test_a_killed_table_resumes_without_redoing_finished_runs_skips_absent_data_and_dry_runs(tmp_path, capsys):
  data_dir = tmp_path / "data"
  authors_tables = write_arrow_dataset(tmp_path / "raw" / "hateful_memes", data_dir / "missing_tables",
                                       "hateful_memes")
  peft = tables.TABLES["mora-peft"]
  table = Table("fixture", "MoRA and LoRA of mora-peft", tuple(c for c in peft.cells if c.row in ("MoRA", "LoRA")),
                seeds=(0,))
  options = runs.Options(workdir=tmp_path / "runs", data_dir=str(data_dir),
                         manual_dirs=(("hateful_memes", str(tmp_path / "raw" / "hateful_memes")),), overrides=TINY)
  mora, lora = (Training("hateful_memes", method) for method in ("mora", "lora"))
  started = []

  def kill_lora_after_its_first_step(step):
    started.append(step)
    if len(started) > 2 and step == 1:  # MoRA's 2 steps, then LoRA's first (checkpointed)
      raise Killed

  with pytest.raises(Killed):
    command.run_table(table, options, (0,), tmp_path / "out", "cmd", step_hook=kill_lora_after_its_first_step)
  first = runs.run_dir(options, mora, 0) / "eval.json"
  finished_at = first.stat().st_mtime_ns
  assert not (runs.run_dir(options, lora, 0) / "eval.json").exists()
  markdown = (tmp_path / "out" / "fixture.md").read_text()
  assert "upmc_food101: skipped, not prepared in --data_dir" in markdown and "--manual_dir upmc_food101=PATH" in markdown
  assert "| LoRA | absent (51.35) | absent (82.14) | … (67.97) |" in markdown

  results = command.run_table(table, options, (0,), tmp_path / "out", "cmd")
  assert first.stat().st_mtime_ns == finished_at  # not redone
  log = capsys.readouterr().out
  assert "resum" in log.lower() and "1 done, 1 to run" in log
  lora_metrics = [json.loads(line) for line in
                  (runs.run_dir(options, lora, 0) / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lora_metrics if r["kind"] == "train"] == [1, 2]  # step 1 once: resumed after it
  done = {r.cell.row: r.mean for r in results if r.cell.column == "Hateful Memes"}
  assert set(done) == {"MoRA", "LoRA"} and all(0 <= v <= 100 for v in done.values())
  if authors_tables:
    assert "provided table" in log and "hatememes_splittrain_missing_both_0.7.pt" in log

  report = command.dry_run(table, options, (0,))
  assert "| hateful_memes/mora-both70 | 1/1 |" in report and "(measured)" in report
  assert "upmc_food101: skipped" in report and "| upmc_food101/lora-both70 | 0/1 |" in report
  estimated = [line for line in report.splitlines() if line.startswith("| upmc_food101/")]
  assert len(estimated) == 2 and all("(estimated)" in line and "unknown" not in line for line in estimated)
  assert json.loads((options.workdir / "throughput.json").read_text())  # the probe's rates, kept for next time


def write_mmimdb_raw(root, movies=24, seed=0):
  """MM-IMDb's raw layout: images/<id>.jpeg, labels/<id>.json (plots, genres), split.json."""
  rng = np.random.RandomState(seed)
  (root / "images").mkdir(parents=True)
  (root / "labels").mkdir()
  ids = [f"{i:04d}" for i in range(movies)]
  for movie in ids:
    genre = ("Drama", "Comedy", "Horror")[rng.randint(3)]
    (root / "images" / f"{movie}.jpeg").write_bytes(coloured_png(rng, [len(genre) % 3]))
    (root / "labels" / f"{movie}.json").write_text(json.dumps({"plot": [f"a {genre} plot"], "genres": [genre]}))
  third = movies // 3
  (root / "split.json").write_text(json.dumps({"train": ids[:third], "dev": ids[third:2 * third],
                                               "test": ids[2 * third:]}))


def test_mmimdb_raw_and_food101_arrow_fill_their_cells_and_retests_fill_other_scenarios(tmp_path):
  write_mmimdb_raw(tmp_path / "raw" / "mm_imdb")
  write_arrow_dataset(tmp_path / "raw" / "upmc_food101", tmp_path / "data" / "missing_tables", "upmc_food101",
                      classes=3)
  trained = Training("mm_imdb", "mora", "text")
  table = Table("fixture", "two datasets, one re-test", (
      Cell("MoRA", "MM-IMDb text 70%", (Measure(trained),)),
      Cell("MoRA", "MM-IMDb image 90%", (Measure(trained, retest=("image", 0.9)),)),
      Cell("MoRA", "Food-101", (Measure(Training("upmc_food101", "mora")),))), seeds=(0,))
  options = runs.Options(workdir=tmp_path / "runs", data_dir=str(tmp_path / "data"), overrides=TINY,
                         manual_dirs=(("mm_imdb", str(tmp_path / "raw" / "mm_imdb")),
                                      ("upmc_food101", str(tmp_path / "raw" / "upmc_food101"))))
  results = {r.cell.column: r for r in command.run_table(table, options, (0,), tmp_path / "out", "cmd")}
  assert all(r.mean is not None for r in results.values())
  mm_imdb = runs.run_dir(options, trained, 0)
  assert json.loads((mm_imdb / "eval.json").read_text())["metric"] == "f1_macro"
  retest = json.loads((mm_imdb / "eval-image-0.9.json").read_text())  # where eval.py writes it
  assert retest["missing"]["type"] == "image" and retest["missing"]["rate"] == 0.9
  assert results["MM-IMDb image 90%"].mean == pytest.approx(100 * retest["test"]["mix"]["f1_macro"])


def test_the_command_refuses_mistakes_before_any_run_and_dry_runs_absent_data(tmp_path, capsys):
  common = ["--workdir", str(tmp_path / "runs"), "--data_dir", str(tmp_path / "none")]
  for argv, fragments in (
      (["mora-pefft"], ("unknown table 'mora-pefft'", "mora-peft")),
      (["mora-peft", "--config.optim.lrr=1"], ("optim.lrr",)),
      (["mora-peft", "--config.optim.lr=-1"], ("optim.lr",)),
      (["mora-peft", "--manual_dir", "food=x"], ("unknown dataset 'food'",)),
      (["easy-vqa", "--seeds", "1", "1"], ("distinct seeds",)),
      (["mora-peft", "--config.seed=7"], ("--config.seed: the table sets it per run", "--seeds")),
      (["mora-peft", "--config.missing.rate=0.5"], ("--config.missing.rate", "--rows")),
      (["easy-vqa-mllm", "--config.projector=linear"], ("--config.projector: the table sets it per run",)),
      (["mora-ablation", "--config.adapter.gram=none"], ("--config.adapter.gram",)),
      (["mora-peft", "--no_measure"], ("--no_measure goes with --dry_run",)),
      (["mora-peft", "--rows", "MoRA", "BitFitt"], ("no row 'BitFitt'", "BitFit")),
      (["mora-peft", "--manual_dir", f"mm_imdb={tmp_path / 'typo'}"], ("is not a folder",)),
      (["mora-peft", "--manual_dir", str(tmp_path)], ("holds none of mm_imdb/",))):
    returncode = cli.main(argv + common)
    assert_one_line_error(capsys.readouterr().err, returncode, *fragments)
  assert cli.main(["mora-peft", "--dry_run", "--no_measure", *common]) == 0
  report = capsys.readouterr().out
  for dataset in ("mm_imdb", "upmc_food101", "hateful_memes"):
    assert f"{dataset}: skipped, not prepared" in report
  assert report.count("| 0/3 |") == 15 and "45 runs" in report
  assert not (tmp_path / "runs").exists()  # a dry run without measuring writes nothing
  assert cli.main(["easy-vqa", "--render_only", *common, "--out", str(tmp_path / "out")]) == 0
  assert "| MoRA | … | … |" in (tmp_path / "out" / "easy-vqa.md").read_text()  # rendered, nothing run
  assert not (tmp_path / "runs").exists()
  assert cli.main(["easy-vqa-mllm", "--dry_run", *common]) == 0  # MLLM runs are not probed, measuring or not
  report = capsys.readouterr().out
  assert report.count("| 0/3 |  | unknown (not measured) | unknown |") == len(tables.MLLM_RUNS)
  assert not (tmp_path / "runs").exists()


def test_the_mllm_table_runs_renders_per_question_type_and_times_its_other_runs(tmp_path, easy_vqa_data):
  """MokA's row on a random tiny CLIP vision tower and Llama, 2 steps per stage, 32 test questions per scenario:
  its run folder, its cells from eval.json (the question types from per_question_type), and the dry run's
  estimate of LoRA's run from it (no probe)."""
  tiny = (("lm.path", str(tiny_lm(tmp_path / "lm", easy_vqa_data))), ("backbone.path", ""),
          ("backbone.random_preset", "tiny"), ("stage1.steps", "2"), ("stage1.batch_size", "8"), ("max_steps", "2"),
          ("batch_size", "8"), ("eval.validation_samples", "32"), ("eval.test_samples", "32"),
          ("eval.batch_size", "32"), ("log_every_steps", "1"))
  options = runs.Options(workdir=tmp_path / "runs", data_dir=str(easy_vqa_data), cache_dir=str(tmp_path / "cache"),
                         overrides=tiny)
  command.run_table(tables.TABLES["easy-vqa-mllm"].restricted(["MokA"]), options, (42,), tmp_path / "out", "cmd")
  moka = Training("easy_vqa", "moka", task="mllm")
  directory = runs.run_dir(options, moka, 42)
  assert directory == tmp_path / "runs" / "easy_vqa" / "mllm-moka-both70" / "seed42"
  results = json.loads((directory / "eval.json").read_text())
  assert results["task"] == "mllm" and results["method"] == "moka"
  markdown = (tmp_path / "out" / "easy-vqa-mllm.md").read_text().splitlines()
  header = next(line for line in markdown if line.startswith("| | "))
  row = next(line for line in markdown if line.startswith("| MokA | "))
  cells = dict(zip(header.split(" | ")[1:], row.split(" | ")[1:]))
  complete = results["test"]["complete"]
  assert cells["color complete"] == f"{100 * complete['per_question_type']['color']:.2f}"
  assert cells["complete"] == f"{100 * complete['exact_match']:.2f}"
  runs.check_same_run(directory, runs.config_of(moka, 42, dataclasses.replace(options, cache_dir="moved")))

  report = command.dry_run(tables.TABLES["easy-vqa-mllm"].restricted(["MokA", "LoRA"]), options, (42,))
  wall = runs.wall_seconds(options, moka, 42)
  assert "| easy_vqa/mllm-moka-both70 | 1/1 |" in report and "(measured)" in report
  lora = next(line for line in report.splitlines() if line.startswith("| easy_vqa/mllm-lora-both70 | 0/1 |"))
  assert "(estimated: the longest finished MLLM run)" in lora and "unknown" not in lora, report
  assert f"{wall:.0f} s" in lora or wall >= 120
  assert not (options.workdir / "throughput.json").exists()  # not probed
