#!/usr/bin/env bash
# metadist as an elastic job (torch elastic through torchrun): run this on every node. Nodes may
# leave and join while it runs: torch elastic restarts the workers at the new world size, and
# metadist resumes from its checkpoint on the same trajectory (train.reduce=exact: the weights do
# not depend on the world size). Usage:
#   RDZV_ENDPOINT=head:29400 launch/torchrun/elastic.sh --config configs/strong.yaml [key=value ...]
# Settings (environment):
#   NNODES=1:4          min:max nodes          NPROC=1   processes (GPUs) per node
#   RDZV_ENDPOINT       host:port of the rendezvous store (c10d backend)
#   RDZV_ID=metadist    the job's name, the same on every node
#   MAX_RESTARTS=10     worker-group restarts after a failure (a real error fails the job after these)
#   RDZV_CONF           extra rendezvous settings, e.g. last_call_timeout=10 or is_host=false
#   TORCHRUN            the torchrun to use (default: .venv/bin/torchrun, else torchrun on PATH)
# A node that leaves gracefully (SIGTERM to this script, as a cluster does before reclaiming it):
# its workers finish the step, every rank checkpoints it, and the others continue at the smaller
# world size from that step. A node that dies: the others continue from the last periodic
# checkpoint (train.checkpoint_every). The store of the c10d backend lives in the agent on the
# endpoint's host unless it runs apart (launch/torchrun/store.py, and RDZV_CONF=is_host=false on
# every node): only then may every node come and go.
set -euo pipefail
cd "$(dirname "$0")/../.."
# torch >= 2.4 shares the agent's store with the workers; then a node that rejoins waits forever for
# the rendezvous' MASTER_ADDR (pytorch#135712, #147064): every round gets its own bootstrap store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
TORCHRUN=${TORCHRUN:-$( [ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun )}
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (the rendezvous store)}"
exec "$TORCHRUN" --nnodes="${NNODES:-1:4}" --nproc-per-node="${NPROC:-1}" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-metadist}" \
    --max-restarts="${MAX_RESTARTS:-10}" ${RDZV_CONF:+--rdzv-conf="$RDZV_CONF"} \
    -m metadist train "$@"
