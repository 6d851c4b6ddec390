"""metadist: distributed, exact, fast meta-training (MAML and family) for few-shot
classification."""

import time

__version__ = "0.1.0"
LAUNCHED = time.time()  # when this process imported metadist: start-up time is measured from here


def load(path, device=None, overrides=()):
    """A trained learner (metadist.api): `metadist.load("runs/boss").adapt(support, labels)`."""
    from metadist.api import load as _load

    return _load(path, device, overrides)
