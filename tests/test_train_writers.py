"""metrics.jsonl after a kill: a last line cut mid-write is skipped by readers and dropped before the next append
(which would otherwise join it to the next record); a damaged line elsewhere is an error naming it."""

import json

import pytest

from mora_jax.train import writers


def test_a_cut_last_line_is_skipped_then_dropped_before_appending(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 1, "kind": "train", "loss": 1.0}) + "\n" + '{"step": 2, "kind": "tr')
  assert [r["step"] for r in writers.read_metrics(tmp_path)] == [1]
  writer = writers.MetricWriter(tmp_path)
  writer.write(2, "train", {"loss": 0.5})
  writer.close()
  assert [(r["step"], r["loss"]) for r in writers.read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5)]


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl, line 1: not a JSON record"):
    writers.read_metrics(tmp_path)
