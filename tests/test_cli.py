"""The command line (metadist/__main__.py): user errors are one line and exit 2, bugs keep their
traceback, commands import only what they use, debug mode keeps explicit keys, `verify`."""

import subprocess
import sys

from metadist import config
from metadist.__main__ import apply_debug
from tests.conftest import ROOT, run_cli


def test_plot_does_not_import_accelerate_torch_or_wandb(tmp_path):
    code = (
        "import sys\nfrom metadist.__main__ import main\ntry:\n    main(['plot', "
        "sys.argv[1]])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('accelerate', 'torch', 'wandb', 'webdataset') if m in "
        "sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr
    assert "no metrics.jsonl" in r.stderr


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path):
    r = run_cli("train", "algo.name=reptile")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "algo.name" in r.stderr
    # a ValueError that is not a MetadistError is a bug: it must not be hidden behind one line
    code = (
        "import metadist.__main__ as m\n"
        "def boom(args):\n    raise ValueError('a bug')\n"
        "m.cmd_plot = boom\nm.main(['plot', 'x'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: a bug" in r.stderr


def test_debug_mode_keeps_keys_the_user_set(tmp_path):
    yaml = tmp_path / "d.yaml"
    yaml.write_text("train:\n  debug: true\n  log_every: 3\n")
    cfg = config.load(yaml, ["tracking.mode=offline"])
    d = apply_debug(cfg, config.explicit_keys(yaml, ["tracking.mode=offline"]))
    assert d.tracking.mode == "offline"  # explicit, though equal to the default
    assert d.train.log_every == 3  # from the YAML file
    assert d.train.steps == 5 and d.eval.test_episodes == 32 and d.run.name == "d-debug"


def test_verify_checks_every_shard(prepared, tmp_path):
    import shutil

    from metadist.data.prepare import shards_dir

    r = run_cli("verify", "--shards", shards_dir(prepared.data))
    assert (
        r.returncode == 0
        and "train: 1 pool + 6 episode shards (19 classes, 96 episodes)" in r.stdout
    )
    assert r.stdout.count("sha256 match") == 3 and "1x28x28 images, data.seed 0" in r.stdout
    bad = tmp_path / "s"
    shutil.copytree(shards_dir(prepared.data), bad)
    victim = bad / "test" / "test-000001.tar"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 1
    victim.write_bytes(bytes(data))
    r = run_cli("verify", "--shards", bad)
    assert r.returncode == 2 and "fails its checksum" in r.stderr and "test-000001.tar" in r.stderr
    pool = bad / "val" / "pool-000000.tar"
    pool.write_bytes(pool.read_bytes()[:-512])
    r = run_cli("verify", "--shards", bad)
    assert r.returncode == 2 and "pool-000000.tar" in r.stderr and "truncated" in r.stderr
