"""Missing tables: docs/protocol.md's construction, seeding, caching, and the authors' .pt tables read without torch."""

import sys

import numpy as np
import pytest

from mora_jax.data import missing


@pytest.mark.parametrize("n, rate", [(1000, 0.7), (8500, 0.7), (101, 0.3), (7, 1.0), (10, 0.0)])
def test_both_rule_counts(n, rate):
  table = missing.build_table(n, missing.Missing(rate=rate, type="both", seed=3))
  k = int(n * rate)
  assert int((table != 0).sum()) == k
  assert int((table == missing.IMAGE_MISSING).sum()) == int(k * 0.5)
  assert int((table == missing.TEXT_MISSING).sum()) == k - int(k * 0.5)


@pytest.mark.parametrize("kind, code", [("text", missing.TEXT_MISSING), ("image", missing.IMAGE_MISSING)])
def test_single_modality_rules(kind, code):
  table = missing.build_table(1000, missing.Missing(rate=0.7, type=kind))
  assert set(np.unique(table)) == {0, code}
  assert int((table == code).sum()) == 700


def test_seeding():
  a = missing.build_table(500, missing.Missing(seed=1))
  assert np.array_equal(a, missing.build_table(500, missing.Missing(seed=1)))
  assert not np.array_equal(a, missing.build_table(500, missing.Missing(seed=2)))


def test_tables_are_cached_and_reused(tmp_path):
  spec = missing.Missing(rate=0.7, type="both", seed=0)
  first = missing.load_or_build(tmp_path, "upmc_food101", "train", 50, spec)
  cached = list(tmp_path.glob("*.npy"))
  assert [p.name for p in cached] == ["upmc_food101_train_missing_both_0.7_seed0.npy"] == [first.path.name]
  assert first.seed == 0 and "generated from seed 0" in first.describe()
  planted = np.zeros(50, np.int8)  # a different table in the cache must be what comes back
  np.save(cached[0], planted)
  assert np.array_equal(missing.load_or_build(tmp_path, "upmc_food101", "train", 50, spec).codes, planted)
  other = missing.load_or_build(tmp_path, "upmc_food101", "test", 50, spec)  # keyed by split too
  assert len(list(tmp_path.glob("*.npy"))) == 2 and first.codes.shape == other.codes.shape


@pytest.mark.parametrize("dataset, split, rate, name", [
    ("mm_imdb", "train", 0.7, "mmimdb_splittrain_missing_both_0.7.pt"),
    ("upmc_food101", "validation", 0.7, "food101_splitval_missing_both_0.7.pt"),
    ("hateful_memes", "test", 1.0, "hatememes_splittest_missing_both_1.0.pt"),
    ("hateful_memes", "test", 1, "hatememes_splittest_missing_both_1.0.pt"),  # an int rate from the command line
])
def test_provided_tables_are_looked_for_under_the_authors_names_first(dataset, split, rate, name):
  names = missing.provided_table_names(dataset, split, missing.Missing(rate=rate))
  assert names[0] == name
  assert names[1:] == [f"{dataset}_{split}_missing_both_{float(rate)}.pt", f"{dataset}_{split}_missing_both_{float(rate)}.npy"]
  assert missing.provided_table_names("easy_vqa", "train", missing.Missing()) == [
      "easy_vqa_train_missing_both_0.7.pt", "easy_vqa_train_missing_both_0.7.npy"]  # no authors' table exists


def test_authors_pt_table_is_read_without_torch(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch", reason="the fixture is written with torch.save")
  codes = np.random.RandomState(0).choice([0, 1, 2], 40).astype(np.float32)
  spec = missing.Missing(rate=0.7, type="both")
  torch.save(torch.tensor(codes), tmp_path / "mmimdb_splittrain_missing_both_0.7.pt")
  monkeypatch.setitem(sys.modules, "torch", None)  # any import of torch now fails
  table = missing.load_or_build(tmp_path, "mm_imdb", "train", 40, spec)
  assert np.array_equal(table.codes, codes.astype(np.int8))
  assert table.seed is None and table.describe() == f"provided table {tmp_path / 'mmimdb_splittrain_missing_both_0.7.pt'}"
  assert not list(tmp_path.glob("*.npy"))  # the authors' table wins; nothing generated


def test_a_table_under_the_project_name_is_used(tmp_path):
  codes = np.random.RandomState(1).choice([0, 1, 2], 30).astype(np.int8)
  np.save(tmp_path / "easy_vqa_validation_missing_image_0.5.npy", codes)
  table = missing.load_or_build(tmp_path, "easy_vqa", "validation", 30, missing.Missing(rate=0.5, type="image"))
  assert np.array_equal(table.codes, codes) and table.seed is None


@pytest.mark.parametrize("values, message", [
    (np.zeros(9, np.float32), r"for the 10 test samples was expected, got shape \(9,\)"),
    (np.full(10, 3, np.float32), r"must be 0 \(complete\), 1 \(text missing\) or 2 \(image missing\); it holds \[3.0\]"),
    (np.full(10, 0.5, np.float32), r"it holds \[0.5\]"),
])
def test_a_provided_table_of_the_wrong_length_or_codes_is_an_error_naming_the_file(tmp_path, values, message):
  torch = pytest.importorskip("torch", reason="the fixture is written with torch.save")
  path = tmp_path / "hatememes_splittest_missing_both_0.7.pt"
  torch.save(torch.tensor(values), path)
  with pytest.raises(ValueError, match=f"^{path}: .*{message}.*another version of this split"):
    missing.load_or_build(tmp_path, "hateful_memes", "test", 10, missing.Missing())
  assert not list(tmp_path.glob("*.npy"))  # never replaced by a generated table


def test_a_wrong_generated_table_says_to_delete_it(tmp_path):
  np.save(tmp_path / "upmc_food101_test_missing_both_0.7_seed0.npy", np.zeros(9, np.int8))
  with pytest.raises(ValueError, match="for the 10 test samples was expected, got shape \\(9,\\).*Delete it"):
    missing.load_or_build(tmp_path, "upmc_food101", "test", 10, missing.Missing())


def test_not_a_tensor_file(tmp_path):
  (tmp_path / "x.pt").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="x.pt is not a torch.save'd tensor"):
    missing.read_torch_tensor(tmp_path / "x.pt")


def test_bad_config():
  with pytest.raises(ValueError, match="missing type 'audio'"):
    missing.Missing(type="audio")
