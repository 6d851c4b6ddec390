"""`metadist plot`: learning curves of a run as a PNG."""
import csv
import json

import pytest
import torch

from metadist import config
from metadist.checkpoint import load_weights
from metadist.checkpoint import load_model
from tests.conftest import run_cli, small_overrides


def test_plot_makes_a_png(trained):
    tmp, _, _ = trained
    r = run_cli("plot", tmp / "runs" / "t", "--out", tmp / "curves.png")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
