"""The rendezvous store of an elastic job, run apart from the training nodes, so that any node may
leave (with the c10d backend the store otherwise lives in the agent on the endpoint's host, and
the job ends when that agent does). Run it on a machine that stays (a login node, a small pod):
    python launch/torchrun/store.py --port 29400
then start every node with RDZV_ENDPOINT=<this host>:29400 RDZV_CONF=is_host=false
launch/torchrun/elastic.sh ...  It serves until it gets SIGTERM or SIGINT.
"""

import argparse
import signal
import sys
import threading
from datetime import timedelta

from torch.distributed import TCPStore

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--host", default="0.0.0.0")
p.add_argument("--port", type=int, default=29400)
args = p.parse_args()
store = TCPStore(
    args.host,
    args.port,
    is_master=True,
    multi_tenant=True,
    wait_for_workers=False,
    timeout=timedelta(seconds=60),
)
done = threading.Event()
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda *_: done.set())
print(f"rendezvous store serving on {args.host}:{args.port}", flush=True)
done.wait()
sys.exit(0)
