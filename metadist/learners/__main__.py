"""python -m metadist.learners RUN "COMMAND": copy a finished run into the package as a shipped
learner (`make learners` does it for each)."""

import sys
from pathlib import Path

from metadist.learners import ship

print(ship(Path(sys.argv[1]), sys.argv[2]))
