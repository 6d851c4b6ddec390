"""Facts about this machine that decide how a run computes, measured once and cached per user:
how many tasks a rank computes at once (metadist/step/plan.py), how long a step takes (the
budget schedule, metadist/schedule.py). The same command on the same machine then reads the same
answer, hence gives the same weights.

The cache is `$METADIST_CACHE_DIR`, else `$XDG_CACHE_HOME/metadist`, else `~/.cache/metadist`; a
record is keyed by the machine and the shape of what was measured. The machine is what changes the
kernels torch picks and their float rounding: the CPU's vendor, family, model and stepping (the
model *name* alone reads "AMD EPYC" for several generations on virtual machines), its vector
flags, the intra-op threads, the torch version and build and the kernel level torch dispatches to
(`ATEN_CPU_CAPABILITY` can lower it), oneDNN's ISA cap (`ONEDNN_MAX_CPU_ISA`), and the GPUs. A
cache in a home folder shared by a cluster's mixed nodes then gives each kind of node its own
records. Concurrent runs take a lock:
one measures, the others wait and read it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from metadist import locks, log


def cache_dir() -> Path:
    if os.environ.get("METADIST_CACHE_DIR"):
        return Path(os.environ["METADIST_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metadist"


# the flags that decide which vector kernels run (x86: SSE..AVX-512, AMX; Arm: NEON, SVE)
VECTOR_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512dq",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)
# /proc/cpuinfo's field for each fact: x86 first, then Arm
_FIELDS = {
    "vendor": ("vendor_id", "CPU implementer"),
    "family": ("cpu family", "CPU architecture"),
    "model": ("model", "CPU part"),
    "stepping": ("stepping", "CPU revision"),
    "name": ("model name",),
    "flags": ("flags", "Features"),
}


@functools.cache
def cpu_facts() -> dict:
    """The first processor's identity in /proc/cpuinfo: vendor, family, model, stepping, model
    name, the vector flags it has (of VECTOR_FLAGS), and its clock now (MHz, not part of keys)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                if fields:
                    break  # the first processor's block
                continue
            k, _, v = line.partition(":")
            fields.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    facts = {
        fact: next((fields[f] for f in names if f in fields), "") for fact, names in _FIELDS.items()
    }
    facts["name"] = facts["name"] or platform.processor() or platform.machine()
    present = set(facts.pop("flags").split())
    facts["vector_flags"] = [f for f in VECTOR_FLAGS if f in present]
    facts["mhz"] = float(fields.get("cpu MHz", 0) or 0)
    return facts


def cpu_model() -> str:
    return cpu_facts()["name"]


@functools.cache
def torch_build() -> str:
    """torch's version, commit and a digest of its build settings (BLAS, oneDNN, compilers)."""
    show = torch.__config__.show()
    return (
        f"{torch.__version__} {torch.version.git_version[:12]} "
        f"{hashlib.sha256(show.encode()).hexdigest()[:12]}"
    )


def onednn_isa() -> str:
    """oneDNN's instruction-set cap (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA), read
    by oneDNN before its first kernel: "native" when unset."""
    env = os.environ
    return (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "native").upper()


def kernels() -> dict:
    """What chooses this process's CPU kernels, hence their float32 rounding: the CPU's vector
    flags, ATen's dispatch level (ATEN_CPU_CAPABILITY lowers it), oneDNN's ISA cap, the intra-op
    threads, torch's build."""
    return {
        "vector_flags": " ".join(cpu_facts()["vector_flags"]),
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": onednn_isa(),
        "threads": torch.get_num_threads(),
        "torch_build": torch_build(),
    }


def machine() -> dict:
    """What this machine's kernels and rounding depend on: the key of every cached fact."""
    cpu = cpu_facts()
    key = {
        "cpu": cpu["name"],
        "cpu_id": f"{cpu['vendor']} family {cpu['family']} model {cpu['model']} "
        f"stepping {cpu['stepping']}",
        "torch": torch.__version__,
        **kernels(),
    }
    if torch.cuda.is_available():
        key["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return key


def inductor_cache() -> Path:
    """Where inductor keeps what it compiled for this machine (TORCHINDUCTOR_CACHE_DIR where the
    user has not set it): in the per-machine cache, one folder per key of `machine()`, so kernels
    built for one CPU's instructions and torch are never read by another."""
    name = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"inductor-{name}"


def provenance(rec: dict) -> str:
    """Where a record of `cached` came from, as the log lines say it."""
    return f"cached in {rec['cache']}" if rec.get("cached") else "measured now"


def cached(kind: str, shape: dict, compute) -> dict:
    """A machine fact of `kind` for this machine and `shape`: from the cache, or computed now by
    `compute() -> dict` and cached (first writer wins; others wait on the lock and read it).
    Returns the record with `key`, `cache` (its file, or None) and `cached` (read, not computed)."""
    key = dict(machine(), shape=shape)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir()
    path = folder / f"{kind}-{name}.json"
    try:
        with locks.node_lock(folder / f"{kind}.lock"):
            if path.is_file():
                rec = json.loads(path.read_text())
                if rec.get("key") == key:
                    return dict(rec, cache=str(path), cached=True)
            rec = dict(compute(), key=key, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(rec, indent=1) + "\n")
            os.replace(tmp, path)
            return dict(rec, cache=str(path), cached=False)
    except OSError as e:  # no writable cache: measure for this run only, and say so
        log.say(
            f"{kind}: cannot use the cache {folder} ({e}); measuring for this run only "
            "(set $METADIST_CACHE_DIR to a writable folder so runs on this machine agree)"
        )
        return dict(compute(), key=key, cache=None, cached=False)
