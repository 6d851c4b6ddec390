"""The short soak (`make soak` is the long one): a 2-process run killed 3 times at random moments
(SIGTERM or SIGKILL, to the launcher or to every process) and relaunched until it completes ends
with the weights of an uninterrupted run."""

import pytest

from bench.soak import soak

pytestmark = pytest.mark.long  # the short soak; `make soak` is the long one


def test_three_random_kills_and_relaunches_equal_an_uninterrupted_run(tmp_path):
    r = soak(tmp_path, kills=3, steps=60, seed=1, log=print)
    assert len(r["kills"]) == 3 and r["equal"], r
