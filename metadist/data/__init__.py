"""Data: raw images (data/sources/) -> episode shards (data/format.py, written by data/prepare.py)
-> bytes from a folder or URL, checked (data/store.py) -> a split read by index (data/split.py)
-> the training order (data/order.py) -> delivered to the device (data/device.py)."""
