"""What a run leaves for people: `metrics.jsonl` (one JSON line per log step and per evaluation) and
TensorBoard event files (tensorboardX, which needs no TensorFlow). Only process 0 writes."""

import json
import time
from pathlib import Path

import jax


class MetricWriter:

  def __init__(self, workdir: str | Path):
    self.enabled = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self._tensorboard = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel  (protobuf import cost)
      self.path.parent.mkdir(parents=True, exist_ok=True)
      _drop_cut_last_line(self.path)
      self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, kind: str, values: dict) -> None:
    """Appends {"step", "kind", "time", **values}; numbers also go to TensorBoard as `<kind>/<name>`."""
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, "time": round(time.time(), 3), **values}
    with self.path.open("a") as f:
      f.write(json.dumps(record, sort_keys=False) + "\n")
    for name, value in _numbers(values):
      self._tensorboard.add_scalar(f"{kind}/{name}", value, int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    """Idempotent: the loop closes a stage's writer when the stage ends, however it ends."""
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def _numbers(values: dict, prefix: str = ""):
  for name, value in values.items():
    if isinstance(value, dict):
      yield from _numbers(value, f"{prefix}{name}/")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f"{prefix}{name}", float(value)


def _drop_cut_last_line(path: Path) -> None:
  """A run killed while writing leaves a last line without its newline; appending after it would join the next
  record to it. The cut record is dropped (the resumed run logs its step again)."""
  if not path.exists():
    return
  text = path.read_text()
  if text and not text.endswith("\n"):
    path.write_text(text[:text.rfind("\n") + 1])


def read_metrics(workdir: str | Path) -> list[dict]:
  """The records of `workdir`'s metrics.jsonl; a last line cut by a kill (or still being written) is skipped, a
  damaged line elsewhere is an error naming it."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number < len(lines):
        raise ValueError(f"{path}, line {number}: not a JSON record ({e.msg}); delete that line.") from e
  return records
