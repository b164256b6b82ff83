"""Progress bars: live on a terminal, plain periodic lines in a log."""

import io

from mora_jax import console


class _Terminal(io.StringIO):

  def isatty(self) -> bool:
    return True


def test_a_bar_written_to_a_log_is_plain_lines_with_the_final_count():
  log = io.StringIO()
  bar = console.bar(total=5, desc="epoch 1/1", unit="step", file=log)
  for _ in range(5):
    bar.update(1)
  bar.set_postfix(loss="0.5000")
  bar.close()
  lines = log.getvalue().splitlines()
  assert "\r" not in log.getvalue() and lines, log.getvalue()
  assert lines[-1].startswith("epoch 1/1: 5/5") and "loss=0.5000" in lines[-1] and lines[-2] != lines[-1]


def test_a_bar_on_a_terminal_is_tqdms_live_bar():
  terminal = _Terminal()
  for _ in console.bar(range(3), desc="test", file=terminal):
    pass
  assert "\r" in terminal.getvalue()
