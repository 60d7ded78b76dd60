"""Experiment configuration: a dataclass schema, YAML presets and `--set key=value` overrides.

A config is an ExperimentConfig; every key has a default, so a YAML file lists only what it
changes. Loading is strict: an unknown key (in YAML or in --set) is an error naming the key and
the keys allowed there, and every value is type-checked against the field's annotation (ints
are accepted for floats, nothing else is coerced; `null` only where the field is Optional).

    cfg = load_config("quick", overrides=["grid.seeds=[0,1]", "eval.images=200"])
    cfg_dict = to_dict(cfg)            # what config.yaml of a run holds

Presets live in sparsekern/experiment/presets/<name>.yaml (preset_names()); a path to any YAML
file works the same way.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

PRESET_DIR = Path(__file__).with_name("presets")


class ConfigError(ValueError):
    """A config that does not match the schema (unknown key, wrong type, invalid value)."""


# ---- schema ----------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Dataset (sparsekern.data.load_dataset). The default, the bundled 10k-digit MNIST sample,
    runs anywhere; full MNIST / Fashion-MNIST / CIFAR-10 need their files under `root` (or
    $SPARSEKERN_DATA, or ~/.cache/sparsekern)."""

    dataset: str = "mnist-sample"
    root: Optional[str] = None
    train_size: Optional[int] = None  # first N training images (None: all)
    test_size: Optional[int] = None   # first N test images for clean accuracy (None: all)


@dataclass
class GridConfig:
    """The cells of the experiment: every model x method x block x sparsity x seed."""

    models: list[str] = field(default_factory=lambda: ["lenet-300-100"])
    methods: list[Literal["magnitude", "dns"]] = field(default_factory=lambda: ["magnitude"])
    block_sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1, 1)])
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.8, 0.9, 0.95, 0.98])
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class TrainConfig:
    """Optimisation of the dense model (once per model x seed)."""

    epochs: int = 20
    batch_size: int = 64
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class DNSConfig:
    """Dynamic Network Surgery: c_rate is solved per layer so that the first mask refresh hits
    the cell's sparsity; masks are then refreshed with probability (1 + gamma*iter)^(-power)
    until iter_stop (null: never stops)."""

    gamma: float = 1e-4
    power: float = 1.0
    iter_stop: Optional[int] = None


@dataclass
class PruneConfig:
    """How a dense model is pruned to a cell's sparsity (method and block come from the grid).

    layers "model": the layers the model's sparse build prunes (model.keep_dense stay dense: the
    CNNs' first conv and last fc); "all": every nn.Linear / nn.Conv2d. The sparsity applies to
    each pruned layer (scope "layer") or to all of them together (scope "global", magnitude
    only). schedule "oneshot": prune, then fine-tune; "gradual": the cubic schedule of Zhu &
    Gupta over the first `gradual_fraction` of the fine-tuning steps (magnitude only).
    """

    layers: Literal["model", "all"] = "model"
    norm: Literal["l1", "l2"] = "l1"
    scope: Literal["layer", "global"] = "layer"
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    gradual_fraction: float = 0.5
    dns: DNSConfig = field(default_factory=DNSConfig)


@dataclass
class AdvTrainConfig:
    """PGD adversarial training (Madry et al.) during fine-tuning: Linf, random start."""

    enabled: bool = False
    eps: float = 0.3
    alpha: float = 0.01
    steps: int = 40


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning after pruning, applied to every cell (the 0% cell too, so every cell gets
    the same training budget). sparse_weights: convert to truly sparse modules before
    fine-tuning, so training (and PGD-AT) runs on the stored blocks only (magnitude one-shot
    pruning only; with DNS the mask moves while training)."""

    epochs: int = 8
    lr: float = 0.01
    sparse_weights: bool = False
    adversarial: AdvTrainConfig = field(default_factory=AdvTrainConfig)


@dataclass
class FGSMConfig:
    enabled: bool = True
    eps: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3])


@dataclass
class PGDConfig:
    """Linf PGD with random start (Madry: MNIST eps 0.3, 40 steps of 0.01)."""

    enabled: bool = True
    eps: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3])
    alpha: float = 0.01
    steps: int = 40
    restarts: int = 1


@dataclass
class DeepFoolConfig:
    """DeepFool on the model's own predictions (label-free), rho_p = mean ||r||_p / ||x||_p over
    the successful examples; one run per norm ("L2" -> rho_2, "Linf" -> rho_inf)."""

    enabled: bool = True
    norms: list[Literal["L2", "Linf"]] = field(default_factory=lambda: ["L2", "Linf"])
    steps: int = 50
    overshoot: float = 0.02
    candidates: Optional[int] = 10  # classes considered per step (null: all)


@dataclass
class CWConfig:
    """Carlini-Wagner L2 on the model's own predictions; mean L2 over successes. Slow: off by
    default, and run on the first `images` evaluation images only (null: all). Adam's lr 0.1:
    with 0.01 (torchattacks' default) 100 steps leave about a third of MNIST examples unbroken
    and bias the mean towards the easy ones."""

    enabled: bool = False
    images: Optional[int] = 100
    c: float = 1.0
    kappa: float = 0.0
    steps: int = 100
    lr: float = 0.1
    binary_search_steps: int = 5


@dataclass
class EvalConfig:
    """Attacks and activation sparsity run on `images` test images (a fixed seeded subset, the
    same for every cell); clean accuracy on data.test_size."""

    images: int = 500
    batch_size: int = 250
    fgsm: FGSMConfig = field(default_factory=FGSMConfig)
    pgd: PGDConfig = field(default_factory=PGDConfig)
    deepfool: DeepFoolConfig = field(default_factory=DeepFoolConfig)
    cw: CWConfig = field(default_factory=CWConfig)


@dataclass
class OutputConfig:
    plots: bool = True
    save_models: bool = True  # checkpoints/cells/<cell>.pt: each final (sparse) state_dict


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    threads: Optional[int] = None  # torch.set_num_threads (null: torch's default)
    data: DataConfig = field(default_factory=DataConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---- generic (de)serialisation ------------------------------------------------------------------
def _fields(cls) -> dict[str, tuple[dataclasses.Field, object]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"[{', '.join(_type_name(a) for a in args)}]"
        return f"list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """value (plain YAML data) checked and converted to type tp; ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad():
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} "
                           f"{value!r}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        if value not in args or type(value) is bool:
            raise ConfigError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got "
                              f"{value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"config schema: unsupported annotation {tp!r} at {key}")  # a schema bug


def _unknown_key(cls, key: str, prefix: str) -> ConfigError:
    where = f"'{prefix[:-1]}'" if prefix else "the top level"
    return ConfigError(f"unknown config key '{prefix}{key}': {where} has "
                       f"{', '.join(_fields(cls))}")


def from_dict(cls, data: dict, prefix: str = ""):
    """An instance of dataclass `cls` from a (nested) dict; defaults fill missing keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix[:-1] or 'config'}: expected a mapping, got "
                          f"{type(data).__name__}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, key, prefix)
        kwargs[key] = _convert(value, fields[key][1], f"{prefix}{key}")
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """Plain nested dict (tuples as lists) of a config dataclass, ready for YAML / JSON."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(obj)


# ---- overrides ---------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], object]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML: 3, 0.5, true, null, [1, 2], text)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse the value {raw!r} ({e})") from None
    return key.split("."), value


def apply_override(data: dict, text: str) -> None:
    """Sets one 'a.b=value' override into a raw config dict, checking the key path against the
    schema (unknown key: ConfigError naming it). Types are checked later, by from_dict."""
    path, value = parse_override(text)
    cls, node, prefix = ExperimentConfig, data, ""
    for i, part in enumerate(path):
        fields = _fields(cls)
        if part not in fields:
            raise ConfigError(f"--set {'.'.join(path)}: {_unknown_key(cls, part, prefix)}")
        tp = fields[part][1]
        if i == len(path) - 1:
            try:
                _convert(value, tp, ".".join(path))  # type check now, to blame the --set
            except ConfigError as e:
                raise ConfigError(f"--set {e}") from None
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {'.'.join(path)}: '{prefix}{part}' is a value, not a "
                              f"section (it has no key {path[i + 1]!r})")
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        cls, node, prefix = tp, child, f"{prefix}{part}."


# ---- validation --------------------------------------------------------------------------------
def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Value checks the types cannot express; ConfigError naming the key. Returns cfg."""
    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    from sparsekern.data import dataset_names
    from sparsekern.models import model_names

    need(cfg.data.dataset in dataset_names(), "data.dataset",
         f"unknown dataset {cfg.data.dataset!r}; expected one of {', '.join(dataset_names())}")
    g = cfg.grid
    for i, m in enumerate(g.models):
        need(m in model_names(), f"grid.models[{i}]",
             f"unknown model {m!r}; expected one of {', '.join(model_names())}")
    for key in ("models", "methods", "block_sizes", "sparsities", "seeds"):
        values = getattr(g, key)
        need(len(values) > 0, f"grid.{key}", "must not be empty")
        need(len(set(map(str, values))) == len(values), f"grid.{key}", f"has duplicates: {values}")
    for i, s in enumerate(g.sparsities):
        need(0.0 <= s < 1.0, f"grid.sparsities[{i}]", f"must be in [0, 1), got {s} (a fraction: "
             f"0.9 means 90% of the weights pruned)")
    for i, (bm, bk) in enumerate(g.block_sizes):
        need(bm >= 1 and bk >= 1, f"grid.block_sizes[{i}]", f"must be positive, got {[bm, bk]}")
    if "dns" in g.methods:
        need(all(tuple(b) == (1, 1) for b in g.block_sizes), "grid.block_sizes",
             "DNS prunes single weights: with method 'dns' every block size must be [1, 1] "
             "(run block sizes with 'magnitude' in another config)")
        need(cfg.prune.scope == "layer", "prune.scope", "DNS thresholds are per layer: use "
             "'layer' with method 'dns'")
        need(cfg.prune.schedule == "oneshot", "prune.schedule", "'gradual' is a magnitude "
             "schedule: use 'oneshot' with method 'dns'")
        need(not cfg.finetune.sparse_weights, "finetune.sparse_weights", "DNS moves the mask "
             "while fine-tuning, so it cannot fine-tune truly sparse weights: set it false")
    if cfg.finetune.sparse_weights:
        need(cfg.prune.schedule == "oneshot", "finetune.sparse_weights",
             "needs prune.schedule 'oneshot' (the gradual schedule changes the mask)")
    need(0.0 < cfg.prune.gradual_fraction <= 1.0, "prune.gradual_fraction", "must be in (0, 1]")
    for sec in ("train", "finetune"):
        t = getattr(cfg, sec)
        need(t.epochs >= 0, f"{sec}.epochs", "must be >= 0")
        need(t.batch_size >= 1, f"{sec}.batch_size", "must be >= 1")
        need(t.lr >= 0, f"{sec}.lr", "must be >= 0")
    need(cfg.train.epochs >= 1, "train.epochs", "the dense model needs at least one epoch")
    e = cfg.eval
    need(e.images >= 1, "eval.images", "must be >= 1")
    need(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    for key, values in (("eval.fgsm.eps", e.fgsm.eps), ("eval.pgd.eps", e.pgd.eps),
                        ("finetune.adversarial.eps", [cfg.finetune.adversarial.eps])):
        need(all(0.0 <= v <= 1.0 for v in values), key, f"must be in [0, 1] (inputs are in "
             f"[0, 1]), got {values}")
        need(len(set(values)) == len(values), key, f"has duplicates: {values}")
    need(e.pgd.steps >= 0 and e.pgd.restarts >= 1, "eval.pgd", "steps >= 0, restarts >= 1")
    need(len(set(e.deepfool.norms)) == len(e.deepfool.norms), "eval.deepfool.norms",
         "has duplicates")
    need(e.cw.images is None or e.cw.images >= 1, "eval.cw.images", "must be >= 1 or null")
    need(cfg.threads is None or cfg.threads >= 1, "threads", "must be >= 1 or null")
    for key in ("train_size", "test_size"):
        v = getattr(cfg.data, key)
        need(v is None or v >= 1, f"data.{key}", "must be >= 1 or null")
    need(cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
         f"expected 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    return cfg


# ---- loading -----------------------------------------------------------------------------------
def preset_names() -> list[str]:
    """Names of the bundled presets (sparsekern/experiment/presets/*.yaml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(preset_or_path: str | Path) -> Path:
    """A preset name or a YAML path -> the file; ConfigError listing the presets otherwise."""
    text = str(preset_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {text!r} does not exist")
        return path
    preset = PRESET_DIR / f"{text}.yaml"
    if not preset.is_file():
        raise ConfigError(f"{text!r} is neither a preset ({', '.join(preset_names())}) nor a "
                          f"YAML file")
    return preset


def load_config(preset_or_path: str | Path | None = None, overrides=()) -> ExperimentConfig:
    """The validated config of a preset name or YAML file (None: the defaults) with the
    'a.b=value' overrides applied in order."""
    data: dict = {}
    source = "defaults"
    if preset_or_path is not None:
        path = resolve_config_path(preset_or_path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for text in overrides:
        apply_override(data, text)
    try:
        return validate(from_dict(ExperimentConfig, data))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def config_from_dict(data: dict) -> ExperimentConfig:
    """The validated config of a plain dict (e.g. a run's config.yaml)."""
    return validate(from_dict(ExperimentConfig, data))
