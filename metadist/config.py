"""The configuration tree: defaults are the canonical run (5-way 1-shot Omniglot MAML).

Precedence: dataclass defaults < YAML file (only what differs) < `section.key=value` overrides,
each parsed by the field's type. `load(path, overrides)` returns a validated Config; every error
names the key and what is allowed. This module imports nothing of metadist but its errors: the
names that tables define (algo.name, algo.head_init: metadist.algorithms; model.backbone:
metadist.models) are checked where those tables build things, and `train` checks them first.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metadist.errors import MetadistError


class ConfigError(MetadistError, ValueError):
    """A configuration that cannot run: unknown key, wrong type or impossible value."""


@dataclass
class RunConfig:
    name: str = ""  # run folder name; "" -> the config file's stem (or "default")
    root: str = "runs"  # run folder = <root>/<name>
    fresh: bool = False  # True: ignore checkpoints in an existing run folder and start over


@dataclass
class FolderConfig:
    """data.source=folder only: how your class folders and split files are read
    (metadist/data/sources/folder.py)."""

    # fractions | lists (train/val/test.txt) | csv (mini-ImageNet's) | folders (train/ val/ test/)
    split: str = "fractions"
    split_dir: str = ""  # lists and csv: where train/val/test.txt or .csv are; "" -> data.raw
    # a class is a folder this many levels down (Omniglot under its root: 3)
    class_depth: int = 1
    test_fraction: float = 0.2  # fractions: share of classes for test (val: data.val_fraction)
    # stretch (to a square, as mini-ImageNet's preparation) | crop (shorter side, then centre)
    resize: str = "stretch"
    # x -> 1 - x before resizing (Omniglot-like strokes; omniglot always inverts)
    invert: bool = False
    # a class with fewer than shots + queries images is an error | skip (counted)
    small_classes: str = "error"


@dataclass
class VariableConfig:
    """data.episode=variable: Meta-Dataset's episode sampler (Triantafillou et al. 2020), every
    constant a setting with the paper's default (metadist/data/episodes.py says the rules)."""

    min_ways: int = 5
    max_ways: int = 50  # ways uniform in [min_ways, min(max_ways, classes)]
    max_query: int = 10  # queries per class: min(max_query, half the smallest chosen class)
    max_support: int = 500  # support images in all, at most
    max_support_per_class: int = 100  # a class's contribution to the support size, at most
    min_log_weight: float = -0.6931471805599453  # log(1/2): a class's share of the support is
    max_log_weight: float = 0.6931471805599453  # its size times exp(U(min, max)) (log 2)
    # one episode's classes from one group: "" (none) | parent (the folder above the class:
    # Omniglot's alphabets) | a file of `class,group` lines
    groups: str = ""


@dataclass
class DataConfig:
    # omniglot | folder (your own class folders and split files: data.folder.*)
    source: str = "omniglot"
    # the dataset's name (manifests, the default shards folder); "" -> omniglot, or data.raw's
    # folder name
    name: str = ""
    # omniglot: zips or folders ("" -> $OMNIGLOT_DIR, else data/raw/omniglot);
    # folder: the dataset's root
    raw: str = ""
    # folder or URL prefix (http(s)://, pipe:...); "" ->
    # data/shards/<name>-<ways>w<shots>s<queries>q-<digest>
    shards: str = ""
    # URL shards: fetched here once per node and mapped from here (else read into memory, process
    # by process); any shards: where the stamps of checked files go (else the per-user cache)
    cache_dir: str = ""
    # the episodes' seed (class split, every train/val/test episode); the run's `seed` is not
    seed: int = 0
    # omniglot: alphabets (the exercise's) | characters (the MAML paper's) | metadataset
    # (Meta-Dataset's split by alphabet)
    protocol: str = "alphabets"
    image_size: int = 28  # images are image_size x image_size after preprocessing
    channels: int = 1  # 1 (grey) | 3 (RGB)
    ways: int = 5
    shots: int = 1
    queries: int = 1  # query images per class in every split
    # the train split's episodes only (0: data.ways / data.queries), as Snell et al. (2017) trained
    # ProtoNets at more ways and queries than they tested; for heads built from the support
    # (algo.name=protonet, algo.head_init=proto|zero)
    train_ways: int = 0
    train_queries: int = 0
    train_episodes: int = 20000
    val_episodes: int = 320
    test_episodes: int = 640
    episodes_per_shard: int = 1000
    # alphabets: share of background characters held out; folder, fractions: share of classes
    val_fraction: float = 0.2
    task_aug: float = 0.0  # probability of rotating a whole training task by 90 or 270 degrees
    num_workers: int = 0  # DataLoader workers per process for the train stream
    # the train split resident on the device: auto (on a GPU, when its pool and records fit
    # device_cache_fraction of the free memory; else batches are prefetched) | on | off
    device_cache: str = "auto"
    device_cache_fraction: float = 0.25
    # mmap: pool files read in place (one copy per node, in the page cache) | memory: each process
    # decodes its own copy (the earlier behaviour; the same batches)
    pool: str = "mmap"
    lock_timeout_s: float = 600.0  # a rank waits this long for another's check or download
    episode: str = "fixed"  # fixed (data.ways, shots, queries) | variable (data.variable.*)
    # many sources in one run: shard folders or URLs, each prepared on its own (then data.shards
    # is not used for training); each episode's source drawn by source_weights (uniform if empty)
    sources: list[str] = field(default_factory=list)
    source_weights: list[float] = field(default_factory=list)
    folder: FolderConfig = field(default_factory=FolderConfig)
    variable: VariableConfig = field(default_factory=VariableConfig)

    def episode_shape(self, split: str) -> tuple[int, int, int]:
        """(ways, shots, queries) of `split`'s fixed episodes: data.train_ways/train_queries for
        the train split where set, else data.ways/shots/queries."""
        train = split == "train"
        return (
            (train and self.train_ways) or self.ways,
            self.shots,
            (train and self.train_queries) or self.queries,
        )


@dataclass
class ModelConfig:
    backbone: str = "conv4"  # conv4 | resnet12 (metadist/models/)
    hidden: int = 64  # conv4: channels of every conv block
    # conv4: blocks, each halving the image (28 -> 14 -> 7 -> 3 -> 1 with 4)
    depth: int = 4
    widths: str = "64,160,320,640"  # resnet12: the four blocks' widths
    # resnet12: DropBlock drop rate after blocks 3 and 4 in meta-training (0 = off)
    dropblock: float = 0.0
    # a weights file to start from (same tensor names; e.g. a pretrain run's backbone.safetensors)
    init: str = ""


@dataclass
class AlgoConfig:
    # maml | fomaml | anil | transfer | protonet | pretrain (metadist/algorithms/__init__.py)
    name: str = "maml"
    # the head a task starts from: learned | zero | shared (UNICORN-MAML) | proto (Proto-MAML)
    head_init: str = "learned"
    inner_steps: int = 1
    inner_lr: float = 0.4
    first_order: bool = False  # maml with first-order inner gradients (fomaml sets it)
    # derivative-order annealing (MAML++): the first N steps first order
    first_order_steps: int = 0
    # auto: the tasks computed at once measured on a CPU (metadist/step/plan.py) | batched
    strategy: str = "auto"
    # tasks computed at once (1: one task at a time, the per-task loop; 0: as algo.strategy
    # decides); train.reduce=exact sums fixed groups of this many tasks
    tasks_per_chunk: int = 0
    # compile the meta-step: auto (a CUDA graph on a GPU; on a CPU inductor where the plan measured
    # that it pays, else eager) | on (inductor on a CPU, a CUDA graph on a GPU) | off
    # (metadist/step/compute.py, metadist/step/plan.py)
    compile: str = "auto"
    checkpoint_inner: bool = False  # recompute inner-loop activations in backward (saves memory)
    # none | layer (a learned lr per tensor) | layer_step (per tensor and step, MAML++'s LSLR) |
    # element (Meta-SGD)
    learn_inner_lr: str = "none"
    # MAML++ multi-step loss: query loss after every inner step, annealed to the last over N meta-
    # steps (0 = off)
    multi_step_loss: int = 0
    # MAML++ per-step BatchNorm weights and biases (meta-learned, not adapted in the inner loop)
    per_step_bn: bool = False


@dataclass
class TrainConfig:
    steps: int = 3000
    meta_batch_size: int = 32  # global tasks per meta-step, over all processes
    meta_lr: float = 1e-3
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 = off; else clip the meta-gradient's global norm
    val_every: int = 250
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    mixed_precision: str = "no"  # no | bf16 (autocast on GPU; meta-gradient stays float32)
    max_minutes: float = 0.0  # 0 = no limit; else stop (and checkpoint) after this wall time
    # fit the step count (and the cosine) to max_minutes, measured once per machine and shape;
    # the fitted count then ends the run, and max_minutes stops it only past OVERRUN (1.25) of
    # the budget (metadist/schedule.py time_limit)
    budget_schedule: bool = False
    # budget_schedule: steps timed before the count is fixed (the lr holds until then)
    budget_probe: int = 30
    debug: bool = False  # single device, anomaly detection, tasks-at-once cross-check
    # a rank that stops answering fails the launch after this long
    collective_timeout_s: float = 600.0
    # steps between host reads of the stop flag (signal, max_minutes); 0 = 1 on CPU, 10 on GPU
    sync_every: int = 0
    # exact: fixed groups' gradients summed by a fixed tree, bit-identical for every world size
    # that splits the groups | fast: one all-reduce
    reduce: str = "exact"
    # exact: the most processes the run's groups must split over (at least the launch's own)
    exact_processes: int = 4
    # intra-op threads per process; 0 = the launcher's default (on a CPU the rounding depends on it)
    threads: int = 0


@dataclass
class EvalConfig:
    inner_steps: int = 10  # test-time adaptation steps (the exercise's 10)
    val_inner_steps: int = 3
    # the test-time adaptation's learning rate (negative: algo.inner_lr)
    inner_lr: float = -1.0
    # adapt every weight at test (P>M>F's fine-tuning: protonet's and pretrain's whole network
    # from the prototype head, ANIL's body too) for eval.inner_steps steps at eval.inner_lr;
    # false: what the algorithm adapts (protonet: nothing, the prototypes alone)
    finetune: bool = False
    # each test-time step's support loss on the support images shifted by an eighth of their
    # side, a new direction each step (algorithms/core.py's `shifted`): 1-shot fine-tuning's
    # pseudo-queries (at its own prototypes a 1-shot support's loss is about 0)
    augment: bool = False
    # test-time augmentation: each task predicted on its images as they are and on views - 1
    # copies moved by a pixel per 28 of their side (SHIFTS' directions), support and query alike;
    # the class probabilities averaged. 1: off
    views: int = 1
    tasks_per_batch: int = 64  # episodes adapted together at evaluation
    test_episodes: int = 0  # 0 = the whole test split; else its first N episodes
    episodes_per_source: int = 600  # with data.sources: test episodes per source (Meta-Dataset's)
    # false: the run ends without reading its test split (summary.json has no test figures);
    # `metadist tune`'s trials, which choose by validation accuracy alone, set it
    test: bool = True


@dataclass
class TrackingConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "metadist"
    entity: str = ""
    log_model: bool = False  # upload final weights as a W&B artifact
    group: str = ""  # W&B's run group ("" none): `metadist sweep` and `tune` name their members'


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # the run's: initialisation, the order it visits the train episodes, task augmentation
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.source": ("omniglot", "folder"),
    "data.protocol": ("alphabets", "characters", "metadataset"),
    "data.folder.split": ("fractions", "lists", "csv", "folders"),
    "data.folder.resize": ("stretch", "crop"),
    "data.folder.small_classes": ("error", "skip"),
    "data.device_cache": ("auto", "on", "off"),
    "data.pool": ("mmap", "memory"),
    "data.episode": ("fixed", "variable"),
    "algo.strategy": ("auto", "batched"),
    "algo.compile": ("auto", "on", "off"),
    "algo.learn_inner_lr": ("none", "layer", "layer_step", "element"),
    "train.schedule": ("constant", "cosine"),
    "train.mixed_precision": ("no", "bf16"),
    "train.reduce": ("exact", "fast"),
    "tracking.mode": ("offline", "online", "disabled"),
}


# keys that moved: a user who sets the old one is told the new one; a saved config (a weights file's
# metadata, an old run's config.yaml) is read with its keys moved
MOVED = {
    f"data.{k}": f"data.folder.{k}"
    for k in (
        "split",
        "split_dir",
        "class_depth",
        "test_fraction",
        "resize",
        "invert",
        "small_classes",
    )
} | {"train.cuda_graph": "algo.compile"}
LOOP = "algo.strategy=loop is algo.tasks_per_chunk=1 now (one task at a time): set that instead"


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _parse(key: str, value, typ):
    """Convert `value` (from YAML or a command-line string) to the field type `typ`; a list field
    takes a YAML list or comma-separated values."""
    if typing.get_origin(typ) is list:
        elem = typing.get_args(typ)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {elem.__name__}, got {value!r}")
        return [_parse(key, v, elem) for v in value]
    if isinstance(value, str) and typ is not str:
        if typ is bool:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        if typ in (int, float):
            try:
                return typ(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
        value = yaml.safe_load(value) if value.strip() else value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def _set(cfg: Config, key: str, value) -> None:
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            if key in MOVED:
                raise ConfigError(f"{key} is now {MOVED[key]}: set that key instead")
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"unknown key {key!r}: valid keys at {where} are {', '.join(fields)}")
        if i == len(parts) - 1:
            typ = typing.get_type_hints(type(obj))[part]
            if dataclasses.is_dataclass(typ):
                raise ConfigError(
                    f"{key} is a section; set one of its keys "
                    f"({', '.join(_fields(getattr(obj, part)))})"
                )
            setattr(obj, part, _parse(key, value, typ))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(
                    f"unknown key {key!r}: {'.'.join(parts[: i + 1])} is not a section"
                )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML at `path` < `key=value` overrides; validated."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        for key, value in _flatten(data).items():
            _set(cfg, key, value)
        if not cfg.run.name:
            cfg.run.name = path.stem
    if not overrides and not cfg.run.name:
        cfg.run.name = "default"
    return override(cfg, overrides)


def explicit_keys(path: str | Path | None, overrides=()) -> set[str]:
    """The keys a user set: those in the YAML file and the `key=value` overrides."""
    keys = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    if path and Path(path).is_file():
        data = yaml.safe_load(Path(path).read_text()) or {}
        if isinstance(data, dict):
            keys |= set(_flatten(data))
    return keys


def override(cfg: Config, overrides) -> Config:
    """A copy of `cfg` with `section.key=value` strings applied, validated."""
    cfg = from_dict(cfg.to_dict(), check=False)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value)
    if not cfg.run.name:
        cfg.run.name = "default"
    validate(cfg)
    return cfg


def from_dict(d: dict, check: bool = True) -> Config:
    """Rebuild a Config from `to_dict()` output (a saved config.yaml); an older run's
    algo.strategy=loop is read as algo.tasks_per_chunk=1, and its train.cuda_graph gives way to
    its algo.compile."""
    cfg = Config()
    flat = _flatten(d)
    if "algo.compile" in flat:
        flat.pop("train.cuda_graph", None)
    if flat.get("algo.strategy") == "loop":
        flat.update({"algo.strategy": "batched", "algo.tasks_per_chunk": 1})
    for key, value in flat.items():
        _set(cfg, MOVED.get(key, key), value)
    if check:
        validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every value in range, each section by its own rules; the first problem is a ConfigError
    naming the key, its value and what is allowed."""
    flat = _flatten(cfg.to_dict())
    if flat["algo.strategy"] == "loop":
        raise ConfigError(LOOP)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r}: allowed values are {', '.join(allowed)}")

    def need(cond: bool, key: str, what: str):
        if not cond:
            raise ConfigError(f"{key}={flat[key]!r}: {what}")

    for check in (_check_data, _check_model_algo, _check_train, _check_eval):
        check(cfg, need)


def _check_data(cfg: Config, need) -> None:
    d = cfg.data
    # numpy reads a seed >= 2^32 as two 32-bit words, so (seed, split, episode) would name another
    # stream's numbers: data.seed=2^32's train episode 0 is data.seed=0's val episode 0
    for key, value in (("data.seed", d.seed), ("seed", cfg.seed)):
        need(0 <= value < 2**32, key, f"is a 32-bit seed: 0 <= {key} < 2^32 (got {value})")
    need(d.ways >= 2, "data.ways", "must be at least 2")
    need(d.shots >= 1, "data.shots", "must be at least 1")
    need(d.queries >= 1, "data.queries", "must be at least 1")
    _check_train_shape(cfg, need)
    if d.source == "omniglot":
        need(
            d.shots + max(d.queries, d.train_queries) <= 20,
            "data.queries",
            "shots + queries must be at most 20 (drawings per character)",
        )
        need(
            d.channels == 1 or d.episode == "variable",
            "data.channels",
            "Omniglot is grey: 1 (3, grey as RGB, with data.episode=variable to mix with colour "
            "sources)",
        )
    need(d.channels in (1, 3), "data.channels", "1 (grey) or 3 (RGB)")
    need(d.image_size >= 4, "data.image_size", "must be at least 4 pixels")
    need(d.folder.class_depth >= 1, "data.folder.class_depth", "must be at least 1")
    need(
        0.0 <= d.folder.test_fraction < 1.0 and d.val_fraction + d.folder.test_fraction < 1.0,
        "data.folder.test_fraction",
        "must be in [0, 1), and with data.val_fraction leave classes for train",
    )
    for k in ("train_episodes", "val_episodes", "test_episodes", "episodes_per_shard"):
        need(getattr(d, k) >= 1, f"data.{k}", "must be positive")
    need(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1)")
    need(0.0 <= d.task_aug <= 1.0, "data.task_aug", "is a probability in [0, 1]")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(0 < d.device_cache_fraction <= 1, "data.device_cache_fraction", "is a fraction in (0, 1]")
    need(d.lock_timeout_s > 0, "data.lock_timeout_s", "must be positive (seconds)")
    if d.episode == "variable":
        _check_variable(d.variable, need)
    need(
        not d.source_weights or len(d.source_weights) == len(d.sources),
        "data.source_weights",
        f"gives {len(d.source_weights)} weight(s) for {len(d.sources)} data.sources: one each",
    )
    need(all(w > 0 for w in d.source_weights), "data.source_weights", "must all be positive")


def _check_train_shape(cfg: Config, need) -> None:
    """data.train_ways / train_queries: the train split's own episode shape."""
    d, a = cfg.data, cfg.algo
    need(d.train_ways >= 0, "data.train_ways", "must be >= 0 (0: data.ways)")
    need(d.train_queries >= 0, "data.train_queries", "must be >= 0 (0: data.queries)")
    if d.episode_shape("train") == d.episode_shape("test"):
        return
    key = "data.train_ways" if d.train_ways else "data.train_queries"
    need(d.episode == "fixed", key, "is for fixed episodes (data.episode=variable draws its own)")
    need(
        a.name == "protonet" or (a.name != "pretrain" and a.head_init in ("proto", "zero")),
        key,
        "trains at another episode shape than the test's, which needs a head built from "
        "each task's support: algo.name=protonet, or algo.head_init=proto|zero (a learned "
        "head has the test's ways)",
    )


def _check_variable(v: VariableConfig, need) -> None:
    need(v.min_ways >= 2, "data.variable.min_ways", "must be at least 2")
    need(
        v.max_ways >= v.min_ways,
        "data.variable.max_ways",
        "must be at least data.variable.min_ways",
    )
    need(v.max_query >= 1, "data.variable.max_query", "must be at least 1")
    need(
        v.max_support >= v.max_ways,
        "data.variable.max_support",
        "must be at least data.variable.max_ways (one support image a class)",
    )
    need(v.max_support_per_class >= 1, "data.variable.max_support_per_class", "must be at least 1")
    need(
        v.min_log_weight <= v.max_log_weight,
        "data.variable.min_log_weight",
        "must not exceed data.variable.max_log_weight",
    )


def _check_model_algo(cfg: Config, need) -> None:
    m, a, t = cfg.model, cfg.algo, cfg.train
    need(m.hidden >= 1, "model.hidden", "must be positive")
    need(m.depth >= 1, "model.depth", "must be positive")
    need(0.0 <= m.dropblock < 1.0, "model.dropblock", "is a drop rate in [0, 1)")
    need(a.inner_steps >= 0, "algo.inner_steps", "must be >= 0")
    need(a.inner_lr >= 0, "algo.inner_lr", "must be >= 0")
    need(a.first_order_steps >= 0, "algo.first_order_steps", "must be >= 0")
    need(a.tasks_per_chunk >= 0, "algo.tasks_per_chunk", "must be >= 0 (0 = no chunking)")
    need(
        a.multi_step_loss >= 0,
        "algo.multi_step_loss",
        "must be >= 0 (meta-steps of annealing; 0 = off)",
    )
    if t.reduce == "exact" and a.tasks_per_chunk:
        need(
            t.meta_batch_size % a.tasks_per_chunk == 0,
            "algo.tasks_per_chunk",
            f"train.reduce=exact cuts train.meta_batch_size={t.meta_batch_size} into chunks of "
            "this size: "
            "choose a divisor",
        )


def _check_train(cfg: Config, need) -> None:
    t = cfg.train
    need(t.steps >= 1, "train.steps", "must be positive")
    need(t.meta_batch_size >= 1, "train.meta_batch_size", "must be positive")
    need(t.meta_lr > 0, "train.meta_lr", "must be positive")
    for k in ("val_every", "log_every", "checkpoint_every", "keep_checkpoints"):
        need(getattr(t, k) >= 1, f"train.{k}", "must be positive")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    need(t.max_minutes >= 0, "train.max_minutes", "must be >= 0")
    need(
        not t.budget_schedule or t.max_minutes > 0,
        "train.budget_schedule",
        "fits the schedule to train.max_minutes: set a time budget",
    )
    need(t.budget_probe >= 5, "train.budget_probe", "must be at least 5 (the first steps warm up)")
    need(t.collective_timeout_s > 0, "train.collective_timeout_s", "must be positive (seconds)")
    need(t.sync_every >= 0, "train.sync_every", "must be >= 0 (0 = automatic)")
    need(t.threads >= 0, "train.threads", "must be >= 0 (0 = the launcher's default)")
    need(t.exact_processes >= 1, "train.exact_processes", "must be positive")


def _check_eval(cfg: Config, need) -> None:
    e = cfg.eval
    need(e.inner_steps >= 0, "eval.inner_steps", "must be >= 0")
    need(e.val_inner_steps >= 0, "eval.val_inner_steps", "must be >= 0")
    need(
        not (e.finetune and cfg.algo.per_step_bn),
        "eval.finetune",
        "cannot adapt per-step BatchNorm weights (algo.per_step_bn=true: meta-learned only)",
    )
    need(e.tasks_per_batch >= 1, "eval.tasks_per_batch", "must be positive")
    need(1 <= e.views <= 9, "eval.views", "must be 1 (off) to 9 (the image and 8 moved copies)")
    need(e.test_episodes >= 0, "eval.test_episodes", "must be >= 0 (0 = all)")
    need(e.episodes_per_source >= 1, "eval.episodes_per_source", "must be positive")


def shares(meta_batch_size: int, world_size: int) -> int:
    """Each rank's number of tasks per step; the global meta-batch must split evenly."""
    if meta_batch_size % world_size:
        raise ConfigError(
            f"train.meta_batch_size={meta_batch_size} does not split evenly over {world_size} "
            "processes: "
            f"choose a multiple of {world_size}"
        )
    return meta_batch_size // world_size


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
