"""Configuration: precedence defaults < YAML < key=value, typed parsing, errors that name the
key."""

import pytest

from metadist import config
from metadist.config import ConfigError


def test_defaults_are_the_canonical_run():
    c = config.load()
    assert (c.data.ways, c.data.shots, c.data.queries) == (5, 1, 1)
    assert (c.algo.name, c.algo.inner_lr, c.algo.inner_steps) == ("maml", 0.4, 1)
    assert (c.train.meta_batch_size, c.train.meta_lr) == (32, 1e-3)
    assert (c.eval.inner_steps, c.eval.val_inner_steps) == (10, 3)
    assert c.data.protocol == "alphabets" and c.tracking.mode == "offline"


def test_precedence_yaml_then_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("algo:\n  inner_lr: 0.1\n  name: fomaml\ntrain:\n  steps: 7\n")
    c = config.load(f, ["train.steps=9", "data.task_aug=0.4", "algo.first_order=yes"])
    assert c.algo.inner_lr == 0.1 and c.algo.name == "fomaml"  # from YAML
    assert c.train.steps == 9  # override beats YAML
    assert c.data.task_aug == 0.4 and c.algo.first_order is True  # parsed by field type
    assert c.run.name == "exp"  # run name from the file stem
    assert c.train.meta_lr == 1e-3  # untouched default


@pytest.mark.parametrize(
    "override, words",
    [
        (["train.stepz=3"], ["train.stepz", "steps", "meta_batch_size"]),
        (["nope.x=1"], ["nope.x", "data", "algo"]),
        (["train.steps=many"], ["train.steps", "int"]),
        (["algo.first_order=maybe"], ["algo.first_order", "true/false"]),
        (["data.ways=1"], ["data.ways", "at least 2"]),
        (["data.shots=0"], ["data.shots", "at least 1"]),
        (["train.meta_batch_size=0"], ["train.meta_batch_size", "positive"]),
        (["data.shots=10", "data.queries=15"], ["shots + queries", "20"]),
        (["data.task_aug=1.5"], ["data.task_aug", "probability"]),
        (["train"], ["section.key=value"]),
        (["train=3"], ["train", "section"]),
    ],
)
def test_errors_name_the_key_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        config.load(None, override)
    for w in words:
        assert w in str(e.value)


def test_yaml_unknown_key_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  wayz: 5\n")
    with pytest.raises(ConfigError, match=r"data\.wayz"):
        config.load(f)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")


def test_shares_must_split_evenly():
    assert config.shares(32, 4) == 8
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        config.shares(32, 3)


def test_round_trip_through_dict():
    c = config.load(None, ["algo.name=anil", "seed=3"])
    assert config.from_dict(c.to_dict()) == c


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    assert {f.stem for f in files} >= {
        "simple",
        "medium",
        "strong",
        "boss",
        "protonet",
        "characters_5w1s",
        "debug",
        "finn2017_maml_omniglot_5w1s",
        "finn2017_maml_omniglot_20w1s",
    }
    from metadist import sweep, tune

    for f in files:
        if f.parent.name == "sweeps":  # sweep and tune files: every member's config checked
            assert sweep.read(f).members()
        elif f.parent.name == "tune":
            assert tune.read(f).space
        else:
            config.load(f)


def test_folder_keys_moved_under_data_folder():
    """The folder-only settings live in data.folder; the old key is one line naming the new one,
    and a config saved with the old keys (older weights files) still reads."""
    c = config.load(
        None, ["data.source=folder", "data.folder.split=csv", "data.folder.class_depth=2"]
    )
    assert c.data.folder.split == "csv" and c.data.folder.class_depth == 2
    for old in (
        "split",
        "split_dir",
        "class_depth",
        "test_fraction",
        "resize",
        "invert",
        "small_classes",
    ):
        with pytest.raises(config.ConfigError, match=rf"^data\.{old} is now data\.folder\.{old}: "):
            config.load(None, [f"data.{old}=1"])
    saved = config.Config().to_dict()
    folder = saved["data"].pop("folder")
    # an older run's config.yaml
    saved["data"].update(split="lists", class_depth=3, invert=True)
    back = config.from_dict(saved)
    assert (back.data.folder.split, back.data.folder.class_depth, back.data.folder.invert) == (
        "lists",
        3,
        True,
    )
    assert back.data.folder.resize == folder["resize"]


def test_a_seed_is_32_bits_since_numpy_would_read_a_larger_one_as_another_stream():
    """numpy's generator reads 2^32 as the words (0, 1): (2^32, train, 0) names the numbers of
    (0, val, 0). Seeds outside [0, 2^32) are one line naming the key."""
    import numpy as np

    a = np.random.default_rng([2**32, 0, 0]).integers(0, 2**31, 4)
    b = np.random.default_rng([0, 1, 0]).integers(0, 2**31, 4)
    assert (a == b).all()  # the collision the check prevents
    for bad in ("data.seed=4294967296", "seed=4294967296", "seed=-1"):
        with pytest.raises(config.ConfigError, match=r"32-bit seed") as e:
            config.load(None, [bad])
        assert "\n" not in str(e.value)
    assert config.load(None, ["data.seed=4294967295"]).data.seed == 2**32 - 1
