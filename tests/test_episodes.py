"""Episodes: layout (support then query, class-major) against the source drawings; task augmentation."""
import json

import numpy as np
import torch

from metadist.data import omniglot
from metadist.data.episodes import labels, rotate_tasks, task_rotations
from metadist.data.prepare import shards_dir
from metadist.data.shards import EpisodeSource, read_manifest

quiet = dict(log=lambda *a: None)


def test_episode_layout_matches_labels(prepared):
    """Support first, then query, class-major; each class's images are drawings of its character."""
    d = shards_dir(prepared) / "train"
    m = read_manifest(d)
    src = EpisodeSource(d)
    x = src.shard(0)[3]
    bg = omniglot.load(prepared.data.raw, "images_background")
    import webdataset as wds
    meta = [json.loads(s["classes.json"]) for s in wds.DataPipeline(
        wds.SimpleShardList([str(d / m["shards"][0]["name"])]), wds.tarfile_to_samples())][3]
    ways, shots, queries = m["ways"], m["shots"], m["queries"]
    ys, yq = labels(ways, shots), labels(ways, queries)
    assert x.shape == (ways * (shots + queries), 28, 28)
    for i, img in enumerate(x):
        c = (ys[i] if i < ways * shots else yq[i - ways * shots]).item()
        cls = meta["classes"][c]
        drawings = bg.images[bg.names.index((cls["alphabet"], cls["character"]))]
        assert any(np.array_equal(img, d_) for d_ in drawings), f"image {i} is not a drawing of class {c}"


def test_task_augmentation_rotates_whole_tasks():
    ks = task_rotations(0, 3, range(200), 0.4)
    assert set(ks) <= {0, 1, 3} and 0.25 < np.mean([k != 0 for k in ks]) < 0.55
    assert task_rotations(0, 3, range(200), 0.4) == ks
    x = torch.rand(2, 3, 1, 28, 28)
    y = rotate_tasks(x, [1, 0])
    assert torch.equal(y[1], x[1]) and torch.equal(y[0], torch.rot90(x[0], 1, dims=(-2, -1)))
