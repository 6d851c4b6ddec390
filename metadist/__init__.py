"""metadist: distributed, exact, fast meta-training (MAML and family) for few-shot
classification."""

import time

__version__ = "0.1.0"
LAUNCHED = time.time()  # when this process imported metadist: start-up time is measured from here
