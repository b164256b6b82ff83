"""Missing tables: PROTOCOL.md's construction, seeding, caching, and the authors' .pt tables read without torch."""

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
  first = missing.load_or_build(tmp_path, "food101", "train", 50, spec)
  cached = list(tmp_path.glob("*.npy"))
  assert [p.name for p in cached] == ["food101_train_missing_both_0.7_seed0.npy"]
  planted = np.zeros(50, np.int8)  # a different table in the cache must be what comes back
  np.save(cached[0], planted)
  assert np.array_equal(missing.load_or_build(tmp_path, "food101", "train", 50, spec), planted)
  other = missing.load_or_build(tmp_path, "food101", "val", 50, spec)  # keyed by split too
  assert len(list(tmp_path.glob("*.npy"))) == 2 and first.shape == other.shape


def test_authors_pt_table_is_read_without_torch(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch", reason="the fixture is written with torch.save")
  codes = np.random.RandomState(0).choice([0, 1, 2], 40).astype(np.float32)
  spec = missing.Missing(rate=0.7, type="both")
  torch.save(torch.tensor(codes), tmp_path / "mmimdb_splittrain_missing_both_0.7.pt")
  monkeypatch.setitem(sys.modules, "torch", None)  # any import of torch now fails
  table = missing.load_or_build(tmp_path, "mmimdb", "train", 40, spec)
  assert np.array_equal(table, codes.astype(np.int8))
  assert not list(tmp_path.glob("*.npy"))  # the authors' table wins; nothing regenerated


def test_wrong_table_is_a_clear_error(tmp_path):
  np.save(tmp_path / "food101_test_missing_both_0.7_seed0.npy", np.zeros(9, np.int8))
  with pytest.raises(ValueError, match="for 10 test samples.*got shape \\(9,\\).*Delete it"):
    missing.load_or_build(tmp_path, "food101", "test", 10, missing.Missing())


def test_not_a_tensor_file(tmp_path):
  (tmp_path / "x.pt").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="x.pt is not a torch.save'd tensor"):
    missing.read_torch_tensor(tmp_path / "x.pt")


def test_bad_config():
  with pytest.raises(ValueError, match="missing type 'audio'"):
    missing.Missing(type="audio")
