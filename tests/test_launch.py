"""Launch recipes that cannot run here (no SLURM, no Kubernetes): their syntax is checked, and
the metadist command they run is parsed by metadist's own config loader."""

import subprocess

import yaml

from metadist import config
from tests.conftest import ROOT


def test_the_kubernetes_job_is_an_elastic_pytorchjob_running_metadist():
    job = yaml.safe_load((ROOT / "launch/k8s/elastic-pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    policy = job["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d" and 1 <= policy["minReplicas"] < policy["maxReplicas"]
    assert policy["maxRestarts"] >= 1
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    cmd = container["command"]
    assert "torchrun" in cmd[0] and cmd[cmd.index("-m") + 1 : cmd.index("-m") + 3] == [
        "metadist",
        "train",
    ]
    rest = cmd[cmd.index("train") + 1 :]
    # keys exist and parse
    cfg = config.load(ROOT / rest[rest.index("--config") + 1], [a for a in rest if "=" in a])
    assert cfg.run.root == "/runs" and cfg.data.shards.startswith("http")
    assert {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"} in container["env"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert cfg.run.root in mounts  # the run folder is shared by every pod


def test_the_shell_recipes_parse():
    for script in ("torchrun/elastic.sh", "slurm/train.sbatch", "slurm/sweep.sbatch"):
        script = f"launch/{script}"
        r = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)
