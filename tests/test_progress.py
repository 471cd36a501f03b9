"""Progress output: a live bar on a terminal, plain throttled lines elsewhere (`perception.progress`)."""

from __future__ import annotations

import io

from perception.progress import progress_bar


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_plain_lines_when_not_a_terminal(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("perception.progress.time.time", clock)
    monkeypatch.setattr("tqdm.std.time", clock, raising=False)
    buf = io.StringIO()
    bar = progress_bar(total=100, desc="train", unit="step", stream=buf, interval_s=10.0, dynamic_ncols=True)
    for i in range(100):
        clock.t += 1.0  # one step per second: a line every 10 steps at most
        bar.update(1)
        bar.set_postfix(loss=f"{i:.3f}")
    bar.close()
    out = buf.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert 5 <= len(lines) <= 13, lines
    assert all(line.startswith("train:") for line in lines)
    assert "100/100" in lines[-1] and "loss=99.000" in lines[-1]
    assert sum("100/100" in line for line in lines) == 1  # the finished bar's line once, with the last postfix


def test_a_terminal_gets_tqdms_own_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    buf = Tty()
    for _ in progress_bar(range(3), desc="eval", stream=buf):
        pass
    assert "\r" in buf.getvalue()
