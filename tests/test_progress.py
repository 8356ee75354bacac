"""Rank 0's console progress within an epoch (actors.progress)."""
import io

import pytest

from actors.progress import EpochProgress, resolve_mode


class Tty(io.StringIO):
    def isatty(self):
        return True


def run(mode, stream, total=10, log_every=4, free=True):
    p = EpochProgress(mode, epoch=3, epochs=20, total=total, batch_size=64, log_every=log_every,
                      read_loss=lambda: 1.2345, loss_is_free=free, stream=stream)
    p.last_draw -= 1.0  # as if the last redraw was a second ago
    for k in range(1, total + 1):
        p.update(k)
    p.close()
    return stream.getvalue()


def test_auto_is_a_bar_on_a_terminal_and_lines_in_a_file():
    assert resolve_mode("auto", Tty()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "lines"
    assert resolve_mode("off", Tty()) == "off"


def test_bar_redraws_one_line_in_place_and_clears_it():
    out = run("bar", Tty())
    assert out.startswith("\repoch  3/20 [") and "\n" not in out  # one line, redrawn with \r
    assert "10/10" in out and "[####################]" in out and "loss 1.234" in out and "img/s" in out
    assert out.endswith("\r\033[K")  # cleared, so the epoch's summary line replaces it


def test_bar_does_not_read_the_loss_when_that_would_sync_an_accelerator():
    assert "loss" not in run("bar", Tty(), free=False)


def test_lines_every_log_every_steps_and_nothing_when_off():
    lines = run("lines", io.StringIO()).splitlines()
    assert [ln.split("|")[0].strip() for ln in lines] == ["epoch 3 step 4/10", "epoch 3 step 8/10"]
    assert all("loss 1.234" in ln for ln in lines)
    assert run("lines", io.StringIO(), log_every=0) == ""
    assert run("off", Tty()) == ""


@pytest.mark.parametrize("value", ["fancy", "", None])
def test_bad_progress_mode_is_refused(value):
    from actors.errors import ConfigError
    from tests.helpers import small_config

    with pytest.raises(ConfigError, match="train.progress must be one of auto, bar, lines, off"):
        small_config(["convnet"], [["Through"]], train={"epochs": 1, "progress": value})
