"""Episodes: layout (support then query, class-major) against the source drawings; the sampler's
draws; task augmentation."""

import numpy as np
import torch

from metadist.data.episodes import labels, rotate_tasks, task_rotations
from metadist.data.prepare import shards_dir
from metadist.data.sources import omniglot
from metadist.data.split import EpisodeSource
from metadist.data.store import read_manifest

quiet = dict(log=lambda *a: None)


def test_episode_layout_matches_labels(prepared):
    """Support first, then query, class-major; each class's images are drawings of its character,
    turned as its record says."""
    d = shards_dir(prepared.data) / "train"
    m = read_manifest(d)
    src = EpisodeSource(d)
    record = src.shard(0)[3]
    x = src.gather(record)
    bg = omniglot.read_set(prepared.data.raw, "images_background")
    ways, shots, queries = m["ways"], m["shots"], m["queries"]
    ys, yq = labels(ways, shots), labels(ways, queries)
    assert x.shape == (ways * (shots + queries), 1, 28, 28) and record.shape == (
        ways * (shots + queries),
        3,
    )
    for i, img in enumerate(x):
        c = (ys[i] if i < ways * shots else yq[i - ways * shots]).item()
        # one class per label
        assert record[i, 0] == record[c * shots if i < ways * shots else i, 0]
        # images_background/<alphabet>/<character>
        name = m["classes"][record[i, 0]]
        drawings = bg.images[bg.names.index(tuple(name.split("/")[1:]))]
        assert np.array_equal(img, np.rot90(drawings[record[i, 1]], record[i, 2], axes=(-2, -1))), i


def test_sampler_draws_are_those_of_choice_over_the_class_list():
    """Picking classes by index draws exactly what numpy's choice over the list itself draws
    (the sampler before format 2 chose from the list of character indices)."""
    from metadist.data.episodes import sample_episode

    chars = [3, 8, 9, 14, 20, 21, 30]
    for seed in range(20):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        rec = sample_episode([20] * len(chars), (0, 1, 2, 3), 5, 1, 2, a)
        picked = b.choice(chars, size=5, replace=False)
        rots = b.choice((0, 1, 2, 3), size=5)
        drawers = [b.choice(20, size=3, replace=False) for _ in range(5)]
        assert [chars[c] for c in rec[::1, 0][:5]] == list(picked)
        assert list(rec[:5, 2]) == list(rots)
        assert [list(rec[[c, 5 + 2 * c, 6 + 2 * c], 1]) for c in range(5)] == [
            list(d) for d in drawers
        ]


def test_task_augmentation_rotates_whole_tasks():
    ks = task_rotations(0, 3, range(200), 0.4)
    assert set(ks) <= {0, 1, 3} and 0.25 < np.mean([k != 0 for k in ks]) < 0.55
    assert task_rotations(0, 3, range(200), 0.4) == ks
    x = torch.rand(2, 3, 3, 28, 28)
    y = rotate_tasks(x, [1, 0])
    assert torch.equal(y[1], x[1]) and torch.equal(y[0], torch.rot90(x[0], 1, dims=(-2, -1)))
