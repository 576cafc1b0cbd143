"""The progress bar: drawn on a terminal, silent elsewhere."""

import io

from cnnkit.progress import ProgressBar


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_redrawn_in_place():
    out = FakeTerminal()
    with ProgressBar(4, desc="epoch 1/2", unit="batches", file=out) as bar:
        for _ in range(4):
            bar.update(1, suffix="loss 0.5")
    text = out.getvalue()
    assert text.startswith("\repoch 1/2 [") and text.endswith("\n")
    assert "100% 4.0/4.0 batches" in text and "loss 0.5" in text and "\n" not in text[:-1]


def test_a_pipe_or_log_file_gets_nothing():
    out = io.StringIO()
    with ProgressBar(4, file=out) as bar:
        bar.update(4)
    assert out.getvalue() == ""


def test_an_unknown_total_shows_a_count():
    out = FakeTerminal()
    with ProgressBar(None, desc="download", unit="MB", scale=1e6, file=out) as bar:
        bar.update(2_500_000)
    assert "download 2.5 MB" in out.getvalue()
