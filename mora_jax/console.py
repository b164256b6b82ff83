"""What a run prints, from process 0 only: messages (`say`) and progress bars that suit where the output goes:
tqdm's live bar on a terminal, and in a log file (batch jobs, `> train.log`, CI) one plain line every
`LOG_EVERY_S` seconds and at the end instead of carriage returns.

    console.say("resumed from ...")
    for batch in console.bar(batches, total=steps, desc="test/complete"):
      ...
"""

import sys

from tqdm import tqdm

from mora_jax import sharding

LOG_EVERY_S = 60.0
# No bar characters in a log line: position, rate and the postfix (loss, samples/s).
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines:
  """A file for tqdm that turns each redraw ('\\r' + status) into one line, dropping the blank redraw with which
  a closing bar clears itself and a redraw that repeats the previous line (closing after set_postfix)."""

  def __init__(self, stream):
    self.stream, self.last = stream, ""

  def write(self, text: str) -> None:
    line = text.replace("\r", "").replace("\x1b[A", "").strip()
    if line and line != self.last:
      self.stream.write(line + "\n")
      self.last = line

  def flush(self) -> None:
    self.stream.flush()


def bar(iterable=None, *, file=None, **options) -> tqdm:
  """tqdm(iterable, **options) on a terminal; otherwise periodic log lines (see the module doc)."""
  file = sys.stderr if file is None else file
  options.setdefault("disable", not sharding.is_main_process())
  if file.isatty():
    return tqdm(iterable, file=file, **options)
  return tqdm(iterable, file=_Lines(file), mininterval=LOG_EVERY_S, miniters=1, bar_format=LOG_FORMAT,
              **options)


def say(message: str) -> None:
  """One message line, between the bars' redraws."""
  if sharding.is_main_process():
    tqdm.write(message)
