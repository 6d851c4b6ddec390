"""`metadist plot`: learning curves of a run as a PNG."""

from tests.conftest import run_cli


def test_plot_makes_a_png(trained):
    tmp, _, _ = trained
    r = run_cli("plot", tmp / "runs" / "t", "--out", tmp / "curves.png")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
