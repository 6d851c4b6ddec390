"""The tests' command runner (tests/zygote.py): a command forked from the zygote gives what a fresh
`python -m metadist` gives (exit status, stdout, stderr, its working folder), and only an
environment torch reads while running is forked."""

import os
import subprocess
import sys

from tests import zygote


def fresh(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "metadist", *args], capture_output=True, text=True, cwd=cwd
    )


def test_a_forked_command_gives_what_a_fresh_interpreter_gives(tmp_path):
    (tmp_path / "here.yaml").write_text("train:\n  stepz: 3\n")  # found from the working folder
    cases = [
        ["--help"],
        ["train", "--config", "here.yaml"],
        ["train", "algo.name=reptile"],
        ["evaluate", "--run", "no-such-run"],
    ]
    zygote.run(["--help"])  # the zygote started
    before = zygote._zygote.forks
    got = {}
    for args in cases:
        a, b = zygote.run(args, cwd=tmp_path), fresh(args, tmp_path)
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args
        got[args[-1]] = a
    assert zygote._zygote.forks == before + len(cases)
    assert got["here.yaml"].returncode == 2 and "'train.stepz'" in got["here.yaml"].stderr
    assert got["--help"].returncode == 0 and "train" in got["--help"].stdout


def test_only_what_torch_reads_while_running_is_forked():
    z = zygote.Zygote()
    try:
        assert z.usable
        env = dict(z.env)
        assert z.forkable(env)
        assert z.forkable(dict(env, METADIST_CACHE_DIR="/tmp/elsewhere", PYTEST_CURRENT_TEST="x"))
        assert z.forkable({k: v for k, v in env.items() if k != "OMNIGLOT_DIR"})
        for caps in ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, {"ATEN_CPU_CAPABILITY": "default"}):
            assert not z.forkable(dict(env, **caps))
        assert not z.forkable(dict(env, OMP_NUM_THREADS="7"))
    finally:
        z.close()
    assert z.proc.wait(timeout=10) == 0 and os.path.isdir(zygote.ROOT)
