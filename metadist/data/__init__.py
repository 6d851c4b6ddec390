"""Data: raw images (data/sources/) -> episode shards (data/format.py, written by data/prepare.py)
-> bytes from a folder or URL, checked (data/store.py) -> meta-batches (data/split.py, order.py, device.py)."""
