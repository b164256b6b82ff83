"""Your own data: a jsonl or csv manifest (single- or multi-label) through data.load, the pipeline and a short
training run per missing scenario; and errors that name the manifest, the line and the fix."""

import base64
import csv
import json
import re

import numpy as np
import pytest

from mora_jax import data
from mora_jax.data import preprocess, tokenizers
from mora_jax.data.builders import manifest as manifest_lib
from mora_jax.train import checkpoint
from mora_jax.train import config as config_lib
from mora_jax.train import job as job_lib
from mora_jax.train import loop, recipes
from tests.helpers import coloured_png

COLOURS = ("red", "green", "blue")  # sorted: blue, green, red
SPLIT_CYCLE = ("train", "train", "train", "train", "validation", "test")  # 24 / 6 / 6 of 36 rows


def manifest_rows(root, rows=36, multi_label=False, seed=0) -> list[dict]:
  """Rows whose colour names are visible in the image (img/<id>.png, every 6th inline) and in the text."""
  rng = np.random.RandomState(seed)
  (root / "img").mkdir(parents=True, exist_ok=True)
  entries = []
  for i in range(rows):
    channels = sorted(rng.choice(3, rng.randint(1, 3), replace=False)) if multi_label else [rng.randint(3)]
    names = [COLOURS[c] for c in channels]
    entry = {"id": f"s{i:02d}", "text": f"a {' and '.join(names)} square", "split": SPLIT_CYCLE[i % 6]}
    entry.update({"labels": names} if multi_label else {"label": names[0]})
    png = coloured_png(rng, channels)
    if i % 6 == 3:
      entry["image_base64"] = base64.b64encode(png).decode()
    else:
      (root / "img" / f"s{i:02d}.png").write_bytes(png)
      entry["image"] = f"img/s{i:02d}.png"
    entries.append(entry)
  return entries


def write_manifest(path, entries) -> str:
  """`entries` as .jsonl, or as .csv with columns for every key (a "labels" list joined by "|")."""
  if path.suffix == ".jsonl":
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(path)
  columns = list(dict.fromkeys(k for e in entries for k in e))
  with path.open("w", newline="") as file:
    writer = csv.DictWriter(file, columns)
    writer.writeheader()
    writer.writerows({k: "|".join(v) if isinstance(v, list) else v for k, v in e.items()} for e in entries)
  return str(path)


def expected_label(entry) -> np.ndarray:
  names = sorted(COLOURS)
  if "labels" in entry:
    return np.isin(names, entry["labels"]).astype(np.int8)
  return np.asarray(names.index(entry["label"]))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@pytest.mark.parametrize("multi_label", [False, True], ids=["single", "multi"])
def test_a_manifest_loads_with_its_classes_splits_and_rows(tmp_path, suffix, multi_label):
  entries = manifest_rows(tmp_path, multi_label=multi_label)
  entries[0]["text"] = ""  # a sample without text
  if multi_label:
    entries[1]["labels"] = []  # of none of the classes
  manifest = data.Manifest(write_manifest(tmp_path / f"my data{suffix}", entries))
  data_dir = tmp_path / "prepared"
  classes = data.classes(data.MANIFEST, data_dir, manifest=manifest)
  assert classes.names == ("blue", "green", "red") and classes.multi_label == multi_label
  logged = []
  for split, count in (("train", 24), ("validation", 6), ("test", 6)):
    ds = data.load(data.MANIFEST, split, data_dir, missing=data.Missing(rate=0.5), manifest=manifest,
                   log=logged.append)
    assert len(ds.source) == count and ds.multi_label == multi_label
    assert ds.name.startswith("manifest_my_data_")
    own = [e for e in entries if e["split"] == split]
    for row, entry in enumerate(own):
      record = ds.source[row]
      assert int(record["row"]) == row and record["id"].decode() == entry["id"]
      assert record["text"].decode() == entry["text"]
      np.testing.assert_array_equal(record["label"], expected_label(entry))
  assert (data_dir / "missing_tables" / f"{ds.name}_test_missing_both_0.5_seed0.npy").is_file()
  assert f"{ds.name}/test: missing both 0.5: generated from seed 0" in logged[-1]
  tokenizer = tokenizers.byte_level_clip_tokenizer(tmp_path / "tok")
  prep = data.Preprocessing(image=preprocess.ImageProcessing.clip(32), max_length=16)
  (batch,) = list(data.batches(ds, 8, tokenizer, train=False, prep=prep))
  assert batch["inputs"].pixels.shape == (8, 32, 32, 3) and batch["valid"].sum() == 6
  np.testing.assert_array_equal(batch["label"][:6], [expected_label(e) for e in entries if e["split"] == "test"])


def test_without_a_split_column_rows_are_split_by_the_seeded_fractions(tmp_path):
  entries = [{k: v for k, v in e.items() if k != "split"} for e in manifest_rows(tmp_path)]
  path = write_manifest(tmp_path / "m.jsonl", entries)
  ids = {}
  for split in ("train", "validation", "test"):
    ds = data.load(data.MANIFEST, split, tmp_path / "prepared", log=lambda _: None,
                   manifest=data.Manifest(path, split_fractions=(0.5, 0.25, 0.25), seed=3))
    ids[split] = [ds.source[i]["id"].decode() for i in range(len(ds.source))]
  assert [len(v) for v in ids.values()] == [18, 9, 9]
  assert sorted(sum(ids.values(), [])) == sorted(e["id"] for e in entries)
  assert all(v == sorted(v) for v in ids.values())  # manifest order within a split
  other_seed = data.Manifest(path, split_fractions=(0.5, 0.25, 0.25), seed=4)
  other = data.load(data.MANIFEST, "test", tmp_path / "prepared", log=lambda _: None, manifest=other_seed)
  assert [other.source[i]["id"].decode() for i in range(9)] != ids["test"]


def test_editing_the_manifest_prepares_it_again_under_another_name(tmp_path):
  entries = manifest_rows(tmp_path)
  path = write_manifest(tmp_path / "m.csv", entries)
  first = data.load(data.MANIFEST, "test", tmp_path / "prepared", log=lambda _: None, manifest=data.Manifest(path))
  assert data.is_prepared(data.MANIFEST, tmp_path / "prepared", data.Manifest(path))
  entries[5]["text"] = "an edited text"  # a test row
  write_manifest(tmp_path / "m.csv", entries)
  assert not data.is_prepared(data.MANIFEST, tmp_path / "prepared", data.Manifest(path))
  second = data.load(data.MANIFEST, "test", tmp_path / "prepared", log=lambda _: None, manifest=data.Manifest(path))
  assert first.name != second.name and second.source[0]["text"] == b"an edited text"
  assert len(list((tmp_path / "prepared" / "manifest").iterdir())) == 2


def run_config(tmp_path, path, **extra):
  config = recipes.base()
  values = {"dataset": "manifest", "manifest.path": path, "data_dir": tmp_path / "prepared", "backbone.path": "",
            "backbone.random_preset": "tiny", "adapter.start_layer": 1, "preprocessing.max_length": 24,
            "batch_size": 16, "eval.batch_size": 16, "epochs": 1, "max_steps": 2, "data_threads": 1, **extra}
  config_lib.apply_overrides(config, [(key, str(value)) for key, value in values.items()])
  return config


@pytest.mark.parametrize("suffix,multi_label,metric", [(".jsonl", False, "accuracy"), (".csv", True, "f1_macro")])
def test_a_short_run_tests_every_scenario_and_does_not_resume_on_an_edited_manifest(tmp_path, capsys, suffix,
                                                                                     multi_label, metric):
  entries = manifest_rows(tmp_path, multi_label=multi_label)
  entries[4]["text"] = "a square of one colour, described at length"  # validation: 38 byte-level tokens
  path = write_manifest(tmp_path / f"m{suffix}", entries)
  results = loop.train(run_config(tmp_path, path), tmp_path / "run")
  assert re.search(r"warning: manifest_m_\w+/validation: .* longer than preprocessing.max_length=24 tokens and are "
                   r"cut to it; --config.preprocessing.max_length=38 keeps them all.\n", capsys.readouterr().out)
  saved = json.loads((tmp_path / "run" / "eval.json").read_text())
  assert saved["metric"] == results["metric"] == metric and saved["dataset"] == "manifest"
  assert set(saved["test"]) == set(data.SCENARIOS)
  assert all(r["samples"] == 6 and 0.0 <= r[metric] <= 1.0 for r in saved["test"].values())
  entries[0]["text"] = "an edited text"
  write_manifest(tmp_path / f"m{suffix}", entries)
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match="trained on manifest_m_.*the manifest changed since"):
    loop.train(run_config(tmp_path, path), tmp_path / "run")


def test_the_manifest_config_is_checked(tmp_path):
  config = run_config(tmp_path, "")
  with pytest.raises(ValueError, match="needs config.manifest.path"):
    job_lib.manifest(config)
  config.manifest.metric = "auroc"
  with pytest.raises(ValueError, match=r"manifest.metric='auroc' is not measured .*3 classes.*f1_macro"):
    job_lib.check_metric(config, data.Classes(names=COLOURS, multi_label=True))


def edit_line(entries, index, **changes):
  entries[index] = {k: v for k, v in {**entries[index], **changes}.items() if v is not None}
  return entries


# (edit of the valid rows, manifest suffix, options, line of the error, what the error says)
ERRORS = {
    "missing image": (lambda e: edit_line(e, 6, image="img/nowhere.png"), ".jsonl", {}, 7,
                      r"image .*img/nowhere.png not found. Fix the path"),
    "bad json": (lambda e: e, ".jsonl", {}, 37, r"not a JSON object .* one JSON object per line"),
    "csv cells": (lambda e: e, ".csv", {}, 38, r"its cells do not match the .* columns .* one cell per column"),
    "unknown split": (lambda e: edit_line(e, 9, split="val"), ".csv", {}, 11,
                      r"unknown split 'val'. Use one of train, validation, test"),
    "unlisted label": (lambda e: edit_line(e, 2, label="purple"), ".jsonl", {"classes": COLOURS}, 3,
                       r"label 'purple' is not in the class list .* add the class to manifest.classes"),
    "no label": (lambda e: edit_line(e, 4, label=None), ".jsonl", {}, 5, r'no "label". Give every row "label"'),
    "some splits": (lambda e: edit_line(e, 8, split=None), ".jsonl", {}, 9,
                    r'no "split", where other rows have one. Give every row a "split"'),
    "bad base64": (lambda e: edit_line(e, 3, image_base64="not base64!"), ".csv", {}, 5,
                   r'"image_base64" is not base64 .* Encode the image'),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_the_manifest_the_line_and_the_fix(tmp_path, case):
  edit, suffix, options, line, message = ERRORS[case]
  path = write_manifest(tmp_path / f"m{suffix}", edit(manifest_rows(tmp_path)))
  if case == "bad json":
    with open(path, "a") as file:
      file.write('{"id": "broken", "text": \n')
  if case == "csv cells":
    with open(path, "a") as file:
      file.write("s99,a text,train,red,img/s00.png,extra,cells\n")
  with pytest.raises((ValueError, FileNotFoundError), match=f"{re.escape(path)}, line {line}: {message}"):
    data.load(data.MANIFEST, "train", tmp_path / "prepared", manifest=data.Manifest(path, **options))


def test_an_empty_split_is_an_error(tmp_path):
  entries = [e for e in manifest_rows(tmp_path) if e["split"] != "validation"]
  path = write_manifest(tmp_path / "m.jsonl", entries)
  with pytest.raises(ValueError, match=rf"manifest {re.escape(path)}: split 'validation' has no rows. Give it some"):
    data.classes(data.MANIFEST, tmp_path / "prepared", manifest=data.Manifest(path))


def relabel(entries, **labels_by_row):
  for row, label in labels_by_row.items():
    entries[int(row[1:])]["label"] = label
  return entries


# (edit of the valid rows, manifest suffix, options, what the error says after "<manifest>, ")
LABEL_ERRORS = {
    "number and string": (lambda e: relabel(e, r0=1, r6="1"), ".jsonl", {},
                          r"lines 1 and 7: labels 1 \(a number\) and '1' are merged into one class '1'. Write every "
                          r"label of a class the same way"),
    "spaces at an end": (lambda e: relabel(e, r8="red "), ".csv", {},
                         r"line 10: \"label\" holds 'red ', with spaces at an end. Remove them: .*'red ' and 'red' "
                         r"would be two classes"),
    "case": (lambda e: relabel(e, r2="Red"), ".jsonl", {},
             r"lines 1 and 3: labels '(red|Red)' and '(red|Red)' differ only in case, spaces or Unicode form, so "
             r"they would be two classes. .* list both in manifest.classes"),
    "unicode form": (lambda e: relabel(e, r1="caf\u00e9", r2="cafe\u0301"), ".jsonl", {},
                     r"lines 2 and 3: labels 'caf.+' and 'caf.+' differ only in case, spaces or Unicode form"),
    "class only in test": (lambda e: relabel(e, r5="purple", r11="purple"), ".jsonl", {},
                           r"1 class\(es\) appear in validation or test but in no train row, so no sample trains "
                           r"them: 'purple' \(line 6\). Add train rows of them, or remove their validation and test "
                           r"rows."),
    "listed class only in test": (lambda e: relabel(e, r4="purple"), ".csv", {"classes": (*COLOURS, "purple")},
                                  r".*no sample trains them: 'purple' \(line 6\)"),
    "duplicate id": (lambda e: edit_line(e, 9, id="s02"), ".jsonl", {},
                     r"lines 3 and 10: both have id 's02'. Give every row its own id"),
    "one class": (lambda e: relabel(e, **{f"r{i}": "red" for i in range(12)}), ".jsonl", {},
                  r"the labels name 1 class\(es\) \['red'\], but a single-label classifier needs at least 2. .* "
                  r"list every class in manifest.classes"),
    "multi-label without classes": (lambda e: [{**edit_line(e, i, label=None)[i], "labels": []} for i in range(12)],
                                    ".csv", {}, r"the labels name 0 class\(es\) \[\], but a multi-label classifier "
                                    r"needs at least 1"),
    "missing value in a csv": (lambda e: relabel(e, r2="NaN"), ".csv", {},
                               r"line 4: label 'NaN' is how a missing value is written, not a class name. Give the "
                               r"row its class, or, if 'NaN' is a class, list the classes in manifest.classes"),
    "missing value as text": (lambda e: relabel(e, r5="None"), ".jsonl", {}, r"line 6: label 'None' is how a missing"),
}


@pytest.mark.parametrize("case", list(LABEL_ERRORS))
def test_label_and_id_mistakes_are_one_error_naming_the_lines_and_the_fix(tmp_path, case):
  edit, suffix, options, message = LABEL_ERRORS[case]
  path = write_manifest(tmp_path / f"m{suffix}", edit(manifest_rows(tmp_path, rows=12)))
  with pytest.raises(ValueError, match=f"^{re.escape(path)}(, |: ){message}") as error:
    manifest_lib.read(data.Manifest(path, **options))
  assert "\n" not in str(error.value)


def test_spellings_listed_as_classes_are_different_classes_and_multi_label_names_are_checked(tmp_path):
  entries = relabel(manifest_rows(tmp_path, rows=12), r0="Red", r6="Red")
  path = write_manifest(tmp_path / "m.jsonl", entries)
  read = manifest_lib.read(data.Manifest(path, classes=("Red", *COLOURS)))
  assert read.class_names == ("Red", *COLOURS)
  entries = manifest_rows(tmp_path, rows=12, multi_label=True)
  entries[7]["labels"] = ["GREEN", "blue"]
  path = write_manifest(tmp_path / "multi.csv", entries)
  with pytest.raises(ValueError, match=r"lines \d+ and 9: labels '(green|GREEN)' and '(green|GREEN)' differ only"):
    manifest_lib.read(data.Manifest(path))


def test_a_listed_missing_value_is_a_class_and_a_null_id_is_none_given(tmp_path):
  entries = [dict(e, id=None) for e in relabel(manifest_rows(tmp_path, rows=12), r0="nan", r6="nan")]
  read = manifest_lib.read(data.Manifest(write_manifest(tmp_path / "m.jsonl", entries), classes=(*COLOURS, "nan")))
  assert read.class_names == (*COLOURS, "nan")
  assert [sample.id for sample in read.splits["train"]] == [str(sample.line) for sample in read.splits["train"]]


CSV_HEADERS = {  # (the manifest, its error after "<manifest>, line 1: ")
    "semicolons": ("image;text;label\na.png;a text;red\n",
                   "the header 'image;text;label' is one column: its columns are separated by ';'. Save the manifest "
                   "with commas"),
    "tabs": ("image\ttext\tlabel\na.png\ta text\tred\n",
             "the header 'image\\ttext\\tlabel' is one column: its columns are separated by '\\t'"),
    "a column twice": ("image,text,label,label\na.png,a text,red,blue\n",
                       "the header names the column(s) ['label'] twice. Give every column its own name"),
}


@pytest.mark.parametrize("case", list(CSV_HEADERS))
def test_a_csv_header_of_another_separator_or_a_repeated_column_is_refused(tmp_path, case):
  text, message = CSV_HEADERS[case]
  path = tmp_path / "m.csv"
  path.write_text(text)
  with pytest.raises(ValueError, match=f"^{re.escape(f'{path}, line 1: {message}')}"):
    manifest_lib.read(data.Manifest(str(path)))


def test_corrupt_images_are_one_error_when_prepared_and_a_repaired_image_prepares_again(tmp_path):
  entries = manifest_rows(tmp_path)
  entries[9]["image_base64"] = base64.b64encode(b"not an image").decode()  # line 10, train
  (tmp_path / "img" / "s05.png").write_bytes((tmp_path / "img" / "s05.png").read_bytes()[:80])  # test
  path = write_manifest(tmp_path / "m.jsonl", entries)
  manifest = data.Manifest(path)
  with pytest.raises(ValueError, match=r"^manifest_m_\w+: 2 of 36 images do not decode .*: m.jsonl line 10 \(train\), "
                     rf"{re.escape(str(tmp_path / 'img' / 's05.png'))} \(test\); .*--config.skip_corrupt=True"):
    data.classes(data.MANIFEST, tmp_path / "prepared", manifest=manifest)
  logged = []
  ds = data.load(data.MANIFEST, "test", tmp_path / "prepared", manifest=manifest, skip_corrupt=True,
                 log=logged.append)
  assert logged[0].startswith(f"warning: {ds.name}: 2 of 36 images do not decode")
  entries[9]["image_base64"] = entries[3]["image_base64"]
  write_manifest(tmp_path / "m.jsonl", entries)
  with pytest.raises(ValueError, match=r"^manifest_m_\w+: 1 of 36 images do not decode .*img/s05.png \(test\)"):
    data.classes(data.MANIFEST, tmp_path / "prepared", manifest=manifest)
  (tmp_path / "img" / "s05.png").write_bytes((tmp_path / "img" / "s11.png").read_bytes())  # repaired in place
  repaired = data.load(data.MANIFEST, "test", tmp_path / "prepared", manifest=manifest)
  assert repaired.name != ds.name and len(repaired.source) == 6


def test_truncated_texts_are_measured_with_the_max_length_that_keeps_them(tmp_path):
  tokenizer = tokenizers.byte_level_clip_tokenizer(tmp_path / "tok")  # one token a character, and BOS and EOS
  texts = ["x" * n for n in range(1, 201)]  # 3 to 202 tokens
  ds = data.Dataset(name="manifest_m_0", split="train", source=[{"text": t.encode()} for t in texts],
                    table=np.zeros(200, np.int8), class_names=("a",), multi_label=False, missing=data.Missing())
  assert data.truncation_warning(ds, tokenizer, 202) is None
  assert data.truncation_warning(ds, tokenizer, 77) == (
      "warning: manifest_m_0/train: 62.5% of the texts (125 of 200) are longer than preprocessing.max_length=77 "
      "tokens and are cut to it; --config.preprocessing.max_length=202 keeps them all; "
      "--config.preprocessing.max_length=201 keeps 99%.")
  assert data.truncation_warning(ds, tokenizer, 24, positions=77).endswith(
      "; the backbone's text tower reads at most 77 tokens, which cuts 62.5%: a backbone that reads longer texts "
      "keeps more.")
