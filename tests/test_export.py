"""export-tasks (the exercise's folder layout) and show (a PNG grid of episodes)."""

import numpy as np

from metadist.data.prepare import shards_dir
from metadist.data.split import EpisodeSource

quiet = dict(log=lambda *a: None)


def test_export_tasks_layout_and_show(prepared, tmp_path):
    from metadist.data.task_files import export_tasks, show

    src = EpisodeSource(shards_dir(prepared.data) / "test")
    n = export_tasks(src.all(3), 5, 1, 1, tmp_path / "tasks", invert=True)
    assert n == 3
    assert sorted(p.name for p in (tmp_path / "tasks" / "support").iterdir()) == [
        "0000",
        "0001",
        "0002",
    ]
    assert sorted(p.name for p in (tmp_path / "tasks" / "query" / "0001").iterdir()) == [
        f"image_{i}.png" for i in range(5)
    ]
    from metadist.api import task_folder
    from metadist.data.images import Images
    from metadist.data.prepare import preprocessing

    tid, support, query = task_folder(tmp_path / "tasks")[1]
    images = Images(preprocessing(prepared.data))
    sx, qx = images.uint8(support), images.uint8(query)
    x = src.all(3)[1]
    assert tid == "0001" and np.array_equal(sx.numpy(), x[:5]) and np.array_equal(qx.numpy(), x[5:])
    png = show(src.all(4), 5, 1, 1, tmp_path / "grid.png", task_aug=1.0)
    from PIL import Image

    w, h = Image.open(png).size
    assert w > 11 * 28 and h > 4 * 28
