"""``memguard check``'s input: a config file -> a validated :class:`CheckSpec`; and the check itself.

These inputs are accepted:

- memguard's own YAML (every key it reads is in :data:`SCHEMA`, with what it means);
- a LightningCLI ``fit`` config (``model``/``data``/``optimizer`` as ``{class_path, init_args}``): the model
  class is imported and built on the meta device; the example batch is a ``memguard.example_batch``, or the
  module's ``example_input_array`` resized by the data module's ``batch_size`` / ``seq_len`` / ``image_size``;
- a transformers ``config.json`` given directly (built with the matching ``AutoModel`` class on meta);
- a Hugging Face Hub id instead of a file: its ``config.json`` from the local cache, else the preset of
  that name (:mod:`memguard.hub`; nothing is downloaded).

A DeepSpeed JSON config named by ``trainer.strategy`` sets the strategy and fills the micro-batch,
accumulation and precision the YAML leaves out (:data:`DEEPSPEED_KEYS`); a value both give differently is
a problem naming both keys.

Files are read with OmegaConf (safe YAML, ``${...}`` interpolation); ``--set key=value`` overrides and the
size and device flags are merged into the raw tree before interpolations are resolved, then validated.
Every problem found is collected and raised at once as one :class:`ConfigError` naming the file and key of
each. Nothing in a config is evaluated as code: importing a ``class_path`` (and
running that class's constructor and ``configure_optimizers`` on the meta device) is the only code that runs.

:func:`load_config` gives the :class:`CheckSpec` that :func:`memguard.check.run_check` checks; nothing here
prints, estimates or touches a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from memguard import hub, optimizers, presets
from memguard.optimizers import first_optimizer
from memguard.errors import InvalidArgumentError, MemguardError, closest, unknown_name
from memguard.gpu_catalog import lookup
from memguard.plan import DEFAULT_MARGIN, KNOBS, TrainingConfig, batch_size_of
from memguard.precision import Precision
from memguard.quantization import QuantScheme

# ---------------------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (file and dotted key) and what."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.message}" if self.key else f"{self.file}: {self.message}"


class ConfigError(MemguardError, ValueError):
    """Everything wrong with a config, found in one pass so the user fixes it in one edit."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = str(self.problems[0])
        else:
            files = {p.file for p in self.problems}
            where = f" in {next(iter(files))}" if len(files) == 1 else ""
            text = f"{len(self.problems)} problems{where}:\n" + "\n".join(
                f"  {p}" for p in self.problems)
        super().__init__(text)


COMMAND_LINE = "command line"
"""What problems with ``--set`` and the other options name as their file."""


class _Problems:
    """A collector: sections report what is wrong and carry on, so one run finds every problem."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[Problem] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(Problem(self.file, key, message))

    @contextlib.contextmanager
    def from_command_line(self) -> Iterator[None]:
        """Problems added meanwhile are about command-line options, not the file."""
        with self.in_file(COMMAND_LINE):
            yield

    @contextlib.contextmanager
    def in_file(self, file: str) -> Iterator[None]:
        """Problems added meanwhile are about another file (a DeepSpeed JSON the config points to)."""
        saved, self.file = self.file, file
        try:
            yield
        finally:
            self.file = saved

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


# ---------------------------------------------------------------------------------------------------------
# The schema


_MISSING = object()

SCHEMA: dict[str, dict[str, str]] = {
    "model": {
        "preset": "a memguard preset name (memguard.presets.names())",
        "hf_config": "a transformers config.json, relative to the config file",
        "class_path": "an importable nn.Module or LightningModule class, built on the meta device",
        "init_args": "keyword arguments of class_path (nested class_path entries are built too)",
        "num_labels": "classification presets: the size of the head",
    },
    "data": {
        "batch_size": "samples per (micro-)batch",
        "seq_len": "tokens per sample",
        "image_size": "pixels per side",
        "class_path": "a LightningDataModule (imported to check it exists, never built)",
        "init_args": "its arguments; batch_size / seq_len / image_size (and common aliases) are read as hints",
    },
    "trainer": {
        "precision": "Lightning's precision string (32-true, 16-mixed, bf16-mixed, 16-true, bf16-true)",
        "gradient_checkpointing": "activation checkpointing of the repeated blocks",
        "accumulate_grad_batches": "micro-batches per optimizer step",
        "devices": "devices per node (an int, a list of indices or 'auto')",
        "num_nodes": "nodes",
        "strategy": "Lightning's strategy name, {deepspeed_config: ...} or {class_path: ...} (STRATEGY_KEYS)",
    },
    "lora": {
        "r": "LoRA rank",
        "alpha": "LoRA alpha (peft's lora_alpha)",
        "target_modules": "module names (or 'all-linear') that get adapters",
        "dropout": "LoRA dropout",
    },
    "memguard": {
        "allow": "fallback knobs the planner may turn (precision, optimizer, micro_batch, checkpointing, offload)",
        "margin": "safety margin on the prediction (0.05 = 5%)",
        "fallback": "search for a plan when the configuration does not fit (default true)",
        "example_batch": "tensors as {shape: [...], dtype: ...}, alone, in a list or in a mapping",
        "zero_grad_before_backward": "Lightning's order (default true): old gradients live through the forward",
    },
}
"""Every key memguard reads, per section, with what it means."""

OPTIMIZER_KEYS = {
    "name": "a catalog optimizer (memguard.optimizers); the mapping's other keys are its hyperparameters",
    "class_path": "a torch.optim.Optimizer class (catalog classes are recognised)",
    "init_args": "its keyword arguments",
}
"""The keys of an ``optimizer:`` mapping (a string names a catalog optimizer directly)."""

TOP_LEVEL = ("model", "data", "optimizer", "trainer", "gpu", "lora", "quantization", "memguard",
             "lr_scheduler", "seed_everything", "ckpt_path")
"""Top-level keys: memguard's own plus LightningCLI's (``lr_scheduler``, ``seed_everything`` and
``ckpt_path`` are accepted and do not change memory)."""

LIGHTNING_TRAINER_ARGS = frozenset({
    "accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches", "limit_val_batches",
    "limit_test_batches", "limit_predict_batches", "overfit_batches", "val_check_interval",
    "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps", "enable_checkpointing",
    "enable_progress_bar", "enable_model_summary", "accumulate_grad_batches", "gradient_clip_val",
    "gradient_clip_algorithm", "deterministic", "benchmark", "inference_mode", "use_distributed_sampler",
    "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm", "reload_dataloaders_every_n_epochs",
    "default_root_dir", "enable_autolog_hparams", "model_registry",
})
"""Lightning 2.x ``Trainer`` arguments: accepted in ``trainer:`` so a LightningCLI config reads unchanged;
those outside :data:`SCHEMA` do not change memory and are ignored."""

_DATA_HINTS = {
    "batch_size": ("batch_size", "train_batch_size", "per_device_train_batch_size"),
    "seq_len": ("seq_len", "seq_length", "max_seq_len", "max_seq_length", "max_length", "block_size",
                "context_length", "sequence_length"),
    "image_size": ("image_size", "img_size", "resolution", "crop_size"),
}
"""Names data modules commonly give the sizes memguard needs, first choice first."""

DDP_LIKE = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true",
            "ddp_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true",
            "ddp_spawn_find_unused_parameters_false", "ddp_fork_find_unused_parameters_true",
            "ddp_fork_find_unused_parameters_false", "ddp_notebook_find_unused_parameters_true",
            "ddp_notebook_find_unused_parameters_false", "dp", "single_device")
"""Strategies where every device holds a full replica of the model, gradients and optimizer state."""
SHARDED = ("fsdp", "fsdp2", "fsdp_cpu_offload", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
           "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
           "deepspeed_stage_3_offload_nvme", "model_parallel")
"""Strategies that shard some of that state across devices."""
STRATEGIES = DDP_LIKE + SHARDED

_STRATEGY_CLASSES = {"DDPStrategy": "ddp", "FSDPStrategy": "fsdp", "DeepSpeedStrategy": "deepspeed",
                     "SingleDeviceStrategy": "single_device", "ModelParallelStrategy": "model_parallel"}

STRATEGY_KEYS = {
    "deepspeed_config": "a DeepSpeed JSON config (path relative to the config file, or a mapping)",
    "class_path": "a Lightning strategy class (DDPStrategy, FSDPStrategy, DeepSpeedStrategy ...)",
    "init_args": "its arguments; DeepSpeedStrategy's config (a JSON path or a mapping), stage, offload_optimizer "
                 "and offload_parameters are read",
}
"""The keys of a ``trainer.strategy`` mapping (a string names a strategy directly)."""

DEEPSPEED_STRATEGY_ARGS = ("config", "stage", "offload_optimizer", "offload_parameters")
"""``DeepSpeedStrategy`` arguments memguard reads; the others do not change what it models."""

DEEPSPEED_KEYS = {
    "zero_optimization.stage": "ZeRO stage: 1, 2, 3 -> deepspeed_stage_1/2/3; 0 shards nothing (modelled as ddp)",
    "zero_optimization.offload_optimizer.device": "cpu or nvme: optimizer state off the GPU "
                                                  "(deepspeed_stage_2_offload; with offload_param at stage 3, "
                                                  "deepspeed_stage_3_offload)",
    "zero_optimization.offload_param.device": "cpu or nvme: stage-3 parameters off the GPU",
    "train_micro_batch_size_per_gpu": "samples per micro-batch: the batch size, when the config gives none",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches, when the config gives none",
    "bf16.enabled": "true: bf16-mixed, when trainer.precision is not given",
    "fp16.enabled": "true: 16-mixed, when trainer.precision is not given",
}
"""What memguard reads from a DeepSpeed JSON config; a value that disagrees with the YAML is an error."""

_ZERO_STAGES = (0, 1, 2, 3)
_OFFLOAD_DEVICES = ("none", "cpu", "nvme")

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "float16": torch.float16,
    "half": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64, "int64": torch.int64, "long": torch.int64,
    "int32": torch.int32, "int": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}

_MAX_DEFAULT_SEQ_LEN = 8192
"""A model's default sequence length is its position table, capped here as the presets are: long-context
releases are trained mostly at this length."""


# ---------------------------------------------------------------------------------------------------------
# The result of loading


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters to add with peft before estimating (QLoRA when ``quantization`` is set too)."""

    r: int = 8
    alpha: float = 16
    target_modules: tuple[str, ...] | str | None = None
    dropout: float = 0.0


@dataclass
class CheckSpec:
    """Everything ``memguard check`` needs, validated.

    ``model_factory`` builds the model on the meta device (once; later calls return the same module, which
    memguard never modifies) and ``batch`` is the example batch on meta. ``training`` holds the knobs the
    planner may turn; ``optimizer`` / ``optimizer_kwargs`` are what :func:`memguard.estimate` gets for the
    configured optimizer (a catalog name, or a class memguard has no catalog entry for).
    """

    path: str
    kind: str
    """"native", "lightningcli" or "hf-config"."""
    model_label: str
    model_factory: Callable[[], nn.Module]
    batch: Any
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None
    training: TrainingConfig
    optimizer: str | type
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool | None = None
    zero_grad_before_backward: bool = True
    quantization: str | None = None
    lora: LoraSpec | None = None
    gpus: tuple[str, ...] = ()
    devices: int | None = 1
    """Devices per node; None when the config says "auto" (decided by the machine at run time)."""
    num_nodes: int = 1
    strategy: str = "auto"
    allow: tuple[str, ...] | None = None
    """Fallback knobs the planner may turn (None: all); an empty tuple forbids every change."""
    margin: float = DEFAULT_MARGIN
    fallback: bool = True
    notes: list[str] = field(default_factory=list)
    """What was assumed where the config was silent, and what the check cannot model."""

    @property
    def world_size(self) -> int | None:
        return None if self.devices is None else self.devices * self.num_nodes


def _cached(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A zero-argument factory that builds once: the meta model is never modified, so one is enough."""
    box: list[nn.Module] = []

    def factory() -> nn.Module:
        if not box:
            box.append(build())
        return box[0]

    return factory


# ---------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Options:
    """Command-line values that replace the config's (None: keep the config's)."""

    gpus: tuple[str, ...] = ()
    devices: int | None = None
    num_nodes: int | None = None
    allow: str | Sequence[str] | None = None
    """Knobs as a list or "precision,optimizer"; an empty string or list forbids every change."""
    margin: float | None = None
    fallback: bool | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    image_size: int | None = None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), options: Options = Options()) -> CheckSpec:
    """Read, merge, validate and build a config: the :class:`CheckSpec`, or one :class:`ConfigError` that
    lists every problem found, in the file and in the options.

    ``overrides`` are OmegaConf dotlist entries (``trainer.precision=bf16-mixed``) merged over the file
    before anything is checked. ``options`` come last and win; ``batch_size`` / ``seq_len`` /
    ``image_size`` replace the data section's (or the data module's hints), and for a ``config.json`` they
    are the only source of the batch shape.
    """
    path = Path(path)
    problems = _Problems(str(path))
    notes: list[str] = []
    hub_model = _hub_model(os.fspath(path), problems, notes)
    base = None if hub_model is None else _hub_base(hub_model)
    found_nowhere = hub_model is not None and base is None  # already reported
    raw = None if found_nowhere else _read(path, overrides, problems, _option_overrides(options), notes, base=base)
    if raw is None:  # unreadable: nothing more can be checked in the file; the options still can
        _Loader(path, {}, "native", problems, options).options()
        problems.raise_if_any()
    if hub_model is not None:
        kind = "native" if hub_model.config_json is None else "hf-config"
    else:
        kind = "hf-config" if path.suffix.lower() == ".json" else _kind(raw)
    loader = _Loader(path, raw, kind, problems, options)
    loader.notes.extend(notes)
    if hub_model is not None:
        loader.source_label = hub_model.repo_id
    spec = loader.load()
    problems.raise_if_any()
    assert spec is not None  # every path that returns None reported a problem
    return spec


def _hub_model(text: str, problems: _Problems, notes: list[str]) -> hub.HubModel | None:
    """A CONFIG argument that is no file but a Hugging Face Hub id, resolved offline (:mod:`memguard.hub`);
    None for a path. An id found nowhere is reported as the file's problem."""
    if not hub.looks_like_hub_id(text):
        return None
    try:
        found = hub.resolve(text)
    except InvalidArgumentError as exc:
        problems.add("", str(exc))
        return hub.HubModel(text)
    if found.config_json is not None:
        notes.append(f"{text}: config.json from the Hugging Face cache ({found.config_json})")
    else:
        notes.append(f"{text}: not in the Hugging Face cache ({hub.cache_dir()}): memguard's preset "
                     f"{found.preset!r}, the published architecture")
    return found


def _hub_base(found: hub.HubModel) -> dict[str, Any] | None:
    """The config a Hub id stands for: its cached config.json, or its preset (None: found nowhere)."""
    if found.config_json is not None:
        return {"model": {"hf_config": str(found.config_json)}}
    if found.preset is not None:
        return {"model": {"preset": found.preset}}
    return None


def _read(path: Path, overrides: Sequence[str], problems: _Problems, options: Mapping[str, int] = {},
          notes: list[str] | None = None, base: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The file merged with the overrides, interpolations resolved, as plain Python data; None when the
    file cannot be read at all. Broken overrides and interpolations are reported and left out.

    Every override (``--set``, then the command-line sizes and device counts in ``options``) is written into
    the raw tree before any interpolation is resolved, and memguard's data sizes are mirrored into the data
    module's own arguments (:func:`_mirror_data_sizes`): a model argument such as
    ``${data.init_args.seq_len}`` then follows ``--set data.seq_len=8192`` like the batch does, instead of
    leaving a 512-position model to be traced on 8192-token batches."""
    from omegaconf import DictConfig, OmegaConf

    if base is not None:
        cfg = OmegaConf.create(dict(base))
    elif not path.is_file():
        problems.add("", "no such file" if not path.exists() else "not a file")
        return None
    elif path.suffix.lower() == ".json":
        cfg = OmegaConf.create({"model": {"hf_config": str(path)}})
    else:
        try:
            cfg = OmegaConf.load(path)
        except Exception as exc:  # noqa: BLE001 - yaml and OmegaConf errors alike become one problem
            problems.add(*_yaml_problem(exc))
            return None
        if not isinstance(cfg, DictConfig):
            problems.add("", "the top level must be a mapping of sections (model:, data:, trainer: ...)")
            return None
    for item in overrides:
        key, sep, value = item.partition("=")
        try:
            if not sep or not key.strip():
                with problems.from_command_line():
                    problems.add("--set", f"{item!r} is not KEY=VALUE (e.g. trainer.precision=bf16-mixed)")
                continue
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{_override_key(cfg, key.strip())}={value}"]))
        except Exception as exc:  # noqa: BLE001 - OmegaConf and YAML errors about the value alike
            message = _yaml_problem(exc)[1] if hasattr(exc, "problem_mark") else _first_line(exc)
            with problems.from_command_line():
                problems.add("--set", f"{item!r}: {message}")
    for key, number in options.items():
        OmegaConf.update(cfg, _override_key(cfg, key), number, merge=True, force_add=True)
    mirrored = _mirror_data_sizes(cfg)
    if notes is not None:
        notes.extend(mirrored)
    resolved = _resolve(cfg, "", problems)
    if isinstance(resolved.get("fit"), dict):  # LightningCLI's `--config` file for the whole CLI
        inner = resolved.pop("fit")
        resolved = _deep_merge(inner, resolved)
    return resolved


_OPTION_KEYS = {"batch_size": "data.batch_size", "seq_len": "data.seq_len", "image_size": "data.image_size",
                "devices": "trainer.devices", "num_nodes": "trainer.num_nodes"}
"""Command-line options that replace a config key, and that key."""


def _option_overrides(options: Options) -> dict[str, int]:
    """The command-line sizes and device counts as config overrides, so interpolations follow them too.
    Only valid values are written: an invalid one is reported under its flag by the loader, once."""
    out = {}
    for name, key in _OPTION_KEYS.items():
        value = getattr(options, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = value
    return out


def _override_key(cfg: Any, key: str) -> str:
    """Where an override lands: in a LightningCLI file that wraps everything in ``fit:``, a key that is not
    at the top level goes inside ``fit``, where the interpolations that read it point."""
    head = key.split(".", 1)[0]
    fit = cfg.get("fit") if hasattr(cfg, "get") else None
    if head == "fit" or head in cfg or not hasattr(fit, "keys"):
        return key
    return f"fit.{key}"


def _mirror_data_sizes(cfg: Any) -> list[str]:
    """memguard's own ``data.batch_size`` / ``seq_len`` / ``image_size``, where a LightningCLI data module
    takes the same size under its own name (``data.init_args.seq_len``, ``block_size`` ...), replace that
    argument in the unresolved tree, so that the model arguments interpolating it are built at the size
    the batch has. Returns what was replaced, in words."""
    from omegaconf import DictConfig

    fit = cfg.get("fit")
    nodes = [n for n in (fit.get("data") if isinstance(fit, DictConfig) else None, cfg.get("data"))
             if isinstance(n, DictConfig)]
    notes = []
    for size, aliases in _DATA_HINTS.items():
        values = [_literal(node, size) for node in nodes]
        value = next((v for v in reversed(values) if v is not None), None)  # the top level wins, as when merged
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        for node in nodes:
            init = node.get("init_args") if "init_args" in node else None
            if not isinstance(init, DictConfig):
                continue
            alias = next((a for a in aliases if a in init and not _is_null(init, a)), None)
            before = None if alias is None else _literal(init, alias)
            if alias is not None and before != value:
                was = "an interpolation" if before is None else before
                init[alias] = value
                notes.append(f"data.{size} {value} also set as data.init_args.{alias} (was {was}), so the model "
                             "arguments interpolated from it follow")
    return notes


def _literal(node: Any, key: str) -> Any:
    """``node[key]`` when it is a plain value; None when it is missing, null or an interpolation."""
    child = node._get_node(key) if key in node else None
    if child is None or child._is_interpolation() or child._is_none():
        return None
    return child._value()


def _is_null(node: Any, key: str) -> bool:
    """Whether ``node[key]`` is null, without resolving an interpolation."""
    child = node._get_node(key)
    return child is None or (not child._is_interpolation() and child._is_none())


def _yaml_problem(exc: Exception) -> tuple[str, str]:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or _first_line(exc)
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None:
        context += f" that starts at line {start.line + 1}, column {start.column + 1}"
    text = f"malformed YAML: {problem}" + (f" ({context})" if context else "")
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}", text
    return "", text


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _resolve(node: Any, prefix: str, problems: _Problems) -> Any:
    """Resolve interpolations leaf by leaf, so that every broken one is reported, not just the first."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(node, DictConfig):
        out: dict[str, Any] = {}
        for key in node.keys():
            where = f"{prefix}.{key}" if prefix else str(key)
            try:
                value = node[key]
            except OmegaConfBaseException as exc:
                problems.add(where, _first_line(exc))
                continue
            out[str(key)] = _resolve(value, where, problems)
        return out
    if isinstance(node, ListConfig):
        items = []
        for i in range(len(node)):
            try:
                value = node[i]
            except OmegaConfBaseException as exc:
                problems.add(f"{prefix}[{i}]", _first_line(exc))
                continue
            items.append(_resolve(value, f"{prefix}[{i}]", problems))
        return items
    return node


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def _kind(raw: Mapping[str, Any]) -> str:
    """LightningCLI when the file has LightningCLI-only keys or a data module; memguard's own otherwise."""
    data = raw.get("data")
    if any(k in raw for k in ("lr_scheduler", "seed_everything", "ckpt_path")):
        return "lightningcli"
    if isinstance(data, Mapping) and "class_path" in data:
        return "lightningcli"
    return "native"


@contextlib.contextmanager
def _import_path(config_dir: Path) -> Iterator[None]:
    """Make modules next to the config and in the working directory importable, as LightningCLI users
    expect when they run their script from the project root."""
    added = [str(p) for p in (config_dir.resolve(), Path.cwd()) if str(p) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(p)


def import_class(path: str, config_dir: Path) -> type:
    """Import ``package.module.Class``; an :class:`InvalidArgumentError` says what failed and suggests names."""
    if not isinstance(path, str) or "." not in path.strip(".") or path.strip() != path:
        raise InvalidArgumentError(f"{path!r} is not a dotted path like 'package.module.ClassName'")
    module_name, _, attr = path.rpartition(".")
    with _import_path(config_dir):
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - the module's own import errors too
            raise InvalidArgumentError(f"cannot import {path!r}: {type(exc).__name__}: {_first_line(exc)}") from exc
    obj = getattr(module, attr, None)
    if obj is None:
        near = closest(attr, [n for n in dir(module) if not n.startswith("_")])
        hint = f" Did you mean {', '.join(repr(f'{module_name}.{n}') for n in near)}?" if near else ""
        raise InvalidArgumentError(f"cannot import {path!r}: module {module_name!r} has no {attr!r}.{hint}")
    if not isinstance(obj, type):
        raise InvalidArgumentError(f"{path!r} is not a class")
    return obj


class _Loader:
    """Validates a resolved config section by section, reporting into ``problems`` and carrying on."""

    def __init__(self, path: Path, raw: dict[str, Any], kind: str, problems: _Problems, options: Options) -> None:
        self.path = path
        self.dir = path.parent
        self.raw = raw
        self.kind = kind
        self.problems = problems
        self.opts = options
        self.notes: list[str] = []
        self.deepspeed: dict[str, Any] | None = None
        """A DeepSpeed JSON's training settings, for :meth:`apply_deepspeed`."""
        self.size_keys: dict[str, str] = {}
        """The key (or flag) each data size came from, to name it in a problem."""
        self.trainer_section: dict[str, Any] = {}
        self.source_label: str | None = None
        """What the model came from, when not a file (a Hugging Face Hub id)."""

    # -- small validators ---------------------------------------------------------------------------------

    def section(self, name: str) -> dict[str, Any]:
        value = self.raw.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problems.add(name, f"must be a mapping, got {_show(value)}")
            return {}
        return value

    def unknown_keys(self, section: str, given: Mapping[str, Any], valid: Iterable[str],
                     listing: str | None = None) -> None:
        valid = list(valid)
        for key in given:
            if key not in valid:
                near = closest(key, valid, n=1)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                shown = ", ".join(sorted(valid)) if listing is None else listing
                self.problems.add(f"{section}.{key}" if section else key, f"unknown key.{hint} Valid: {shown}.")

    def positive_int(self, key: str, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.add(key, f"must be a positive integer, got {_show(value)}")
            return None
        if value < 1:
            self.problems.add(key, f"must be a positive integer, got {value}")
            return None
        return value

    def boolean(self, key: str, value: Any) -> bool | None:
        if value is None or isinstance(value, bool):
            return value
        self.problems.add(key, f"must be true or false, got {_show(value)}")
        return None

    def number(self, key: str, value: Any, *, low: float, high: float, low_open: bool = False) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problems.add(key, f"must be a number, got {_show(value)}")
            return None
        if value < low or (low_open and value == low) or value > high:
            bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
            self.problems.add(key, f"must be {bound}, got {value:g}")
            return None
        return float(value)

    def name(self, key: str, value: Any, parse: Callable[[str], Any]) -> Any:
        """Run a library parser (precision, optimizer, GPU...) and turn its error into a problem."""
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            self.problems.add(key, f"must be a name, got {_show(value)}")
            return None
        try:
            return parse(str(value))
        except InvalidArgumentError as exc:
            self.problems.add(key, str(exc))
            return None

    def cls(self, key: str, path: Any) -> type | None:
        try:
            return import_class(path, self.dir)
        except InvalidArgumentError as exc:
            self.problems.add(key, str(exc))
            return None

    # -- the sections -------------------------------------------------------------------------------------

    def load(self) -> CheckSpec | None:
        self.unknown_keys("", self.raw, TOP_LEVEL)
        model_section = self.section("model")
        data = self.data_hints()
        trainer = self.trainer()
        self.apply_deepspeed(data, trainer, self.trainer_section)
        lora = self.lora()
        quantization = self.quantization()
        mg = self.memguard()
        gpus = self.gpus(self.raw.get("gpu"), "gpu")
        model = self.model(model_section)
        optimizer = self.optimizer()
        given = self.options()
        for key in ("devices", "num_nodes"):
            if key in given:
                trainer[key] = given[key]
        for key in ("allow", "margin", "fallback"):
            if key in given:
                mg[key] = given[key]
        gpus = given.get("gpus", gpus)
        if self.problems or model is None:
            return None
        return self.build(model, data, trainer, lora, quantization, mg, gpus, optimizer)

    def data_hints(self) -> dict[str, int | None]:
        data = self.section("data")
        valid = list(SCHEMA["data"])
        self.unknown_keys("data", data, valid)
        sizes: dict[str, int | None] = {k: None for k in _DATA_HINTS}
        for key in sizes:
            sizes[key] = self.positive_int(f"data.{key}", data.get(key))
            if sizes[key] is not None:
                self.size_keys[key] = f"data.{key}"
        if "class_path" in data:
            self.cls("data.class_path", data["class_path"])
            init = data.get("init_args") or {}
            if not isinstance(init, dict):
                self.problems.add("data.init_args", f"must be a mapping, got {_show(init)}")
                init = {}
            for key, aliases in _DATA_HINTS.items():
                found = next((a for a in aliases if init.get(a) is not None), None)
                if found is not None and sizes[key] is None:
                    sizes[key] = self.positive_int(f"data.init_args.{found}", init[found])
                    self.size_keys[key] = f"data.init_args.{found}"
        elif data.get("init_args") is not None:
            self.problems.add("data.init_args", "needs data.class_path")
        for key in sizes:
            value = getattr(self.opts, key)
            if value is not None:
                with self.problems.from_command_line():
                    sizes[key] = self.positive_int(f"--{key.replace('_', '-')}", value)
                self.size_keys[key] = f"--{key.replace('_', '-')}"
        return sizes

    def trainer(self) -> dict[str, Any]:
        trainer = self.section("trainer")
        ours = list(SCHEMA["trainer"])
        self.unknown_keys("trainer", trainer, sorted(LIGHTNING_TRAINER_ARGS | set(ours)),
                          listing=", ".join(ours) + " (other Lightning Trainer arguments are accepted and ignored)")
        out: dict[str, Any] = {}
        precision = trainer.get("precision")
        out["precision"] = "32-true" if precision is None else (
            self.name("trainer.precision", precision, lambda s: str(Precision.parse(s))))
        out["gradient_checkpointing"] = self.boolean("trainer.gradient_checkpointing",
                                                     trainer.get("gradient_checkpointing"))
        out["accumulate_grad_batches"] = self.positive_int("trainer.accumulate_grad_batches",
                                                           trainer.get("accumulate_grad_batches")) or 1
        out["devices"] = self.devices("trainer.devices", trainer.get("devices"))
        out["num_nodes"] = self.positive_int("trainer.num_nodes", trainer.get("num_nodes")) or 1
        out["strategy"] = self.strategy(trainer.get("strategy"))
        self.trainer_section = trainer
        accelerator = trainer.get("accelerator")
        if isinstance(accelerator, str) and accelerator.lower() in ("cpu", "tpu", "mps", "hpu"):
            self.notes.append(f"trainer.accelerator is {accelerator!r}; memguard check predicts CUDA GPU memory")
        return out

    def devices(self, key: str, value: Any) -> int | None | object:
        """Lightning's ``devices``: a count, a list of indices, a "0,1" string, or "auto" / -1 (None here)."""
        if value is None:
            return 1
        if value in ("auto", -1, "-1"):
            return None
        if isinstance(value, list):
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                self.problems.add(key, f"a list of devices must hold device indices, got {_show(value)}")
                return _MISSING
            return len(value)
        if isinstance(value, str) and value.replace(",", "").replace(" ", "").isdigit():
            parts = [p for p in value.split(",") if p.strip()]
            return len(parts) if "," in value else int(value)
        count = self.positive_int(key, value)
        return _MISSING if count is None else count

    def strategy(self, value: Any) -> str:
        """A strategy name, ``{deepspeed_config: ...}`` or ``{class_path, init_args}``; a DeepSpeed JSON's
        training settings are kept in ``self.deepspeed`` for :meth:`apply_deepspeed`."""
        key = "trainer.strategy"
        if value is None:
            return "auto"
        if isinstance(value, dict):
            self.unknown_keys(key, value, STRATEGY_KEYS)
            if "deepspeed_config" in value:
                if "class_path" in value:
                    self.problems.add(key, "give either deepspeed_config or class_path, not both")
                    return "auto"
                return self.deepspeed_strategy(value["deepspeed_config"], f"{key}.deepspeed_config", {})
            path = value.get("class_path")
            if not isinstance(path, str):
                self.problems.add(key, "a strategy mapping needs class_path or deepspeed_config")
                return "auto"
            short = path.rpartition(".")[2]
            name = _STRATEGY_CLASSES.get(short)
            if name is None:
                self.problems.add(f"{key}.class_path", f"memguard does not know the strategy class {short!r}. "
                                                       f"Known: {', '.join(sorted(_STRATEGY_CLASSES))}.")
                return "auto"
            init = value.get("init_args") or {}
            if not isinstance(init, dict):
                self.problems.add(f"{key}.init_args", f"must be a mapping, got {_show(init)}")
                return "auto"
            if name != "deepspeed":
                return name
            if init.get("config") is not None:
                return self.deepspeed_strategy(init["config"], f"{key}.init_args.config", init)
            stage = init.get("stage", 2)
            if stage not in _ZERO_STAGES or isinstance(stage, bool):
                self.problems.add(f"{key}.init_args.stage", f"unknown ZeRO stage {_show(stage)}; DeepSpeed's "
                                                            f"stages are {', '.join(map(str, _ZERO_STAGES))}")
                return "auto"
            offload = {"optimizer": bool(init.get("offload_optimizer")),
                       "parameters": bool(init.get("offload_parameters"))}
            return self.deepspeed_name(stage, offload, f"{key}.init_args")
        if not isinstance(value, str) or value not in STRATEGIES:
            self.problems.add(key, str(unknown_name("strategy", str(value), STRATEGIES)))
            return "auto"
        return value

    # -- DeepSpeed JSON configs -----------------------------------------------------------------------------

    def deepspeed_strategy(self, value: Any, key: str, init_args: Mapping[str, Any]) -> str:
        """The strategy a DeepSpeed config (a JSON file or an inline mapping at ``key``) describes; its
        micro-batch, accumulation and precision are kept for :meth:`apply_deepspeed`."""
        if isinstance(value, str):
            file = self.deepspeed_file(value, key)
            if file is None:
                return "auto"
            config = self.json_object(file, key, "DeepSpeed's config")
            where = str(file)
        elif isinstance(value, dict):
            config, where, file = value, key, None
        else:
            self.problems.add(key, f"must be a path to a DeepSpeed JSON config or a mapping, got {_show(value)}")
            return "auto"
        if config is None:
            return "auto"
        sink = self.problems.in_file(str(file)) if file is not None else contextlib.nullcontext()
        prefix = "" if file is not None else f"{key}."
        with sink:
            settings = self.deepspeed_settings(config, prefix)
        if settings is None:
            return "auto"
        stage, offload = settings.pop("stage"), settings.pop("offload")
        if "stage" in init_args and init_args["stage"] != stage:
            self.problems.add(key.rpartition(".")[0] + ".stage",
                              f"{_show(init_args['stage'])} conflicts with {where}: zero_optimization.stage is "
                              f"{stage} (DeepSpeed uses the config's); make them agree or drop one")
            return "auto"
        self.deepspeed = {**settings, "source": where}
        return self.deepspeed_name(stage, offload, where)

    def deepspeed_file(self, value: str, key: str) -> Path | None:
        """The JSON file: relative to the config file, else to the working directory (where Lightning,
        which opens the path as given, would look)."""
        given = Path(value).expanduser()
        candidates = [given] if given.is_absolute() else [self.dir / given, given]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            self.problems.add(key, f"no such file: {candidates[0]}" + (
                f" (nor {candidates[1]} in the working directory)" if len(candidates) > 1 and
                candidates[1] != candidates[0] else ""))
        return found

    def json_object(self, file: Path, key: str, what: str) -> dict[str, Any] | None:
        """``file``'s JSON object, or None with the problem recorded under ``key`` (``what`` names the
        object expected, for the message)."""
        try:
            content = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            self.problems.add(key, f"cannot read {file}: {exc}")
            return None
        except json.JSONDecodeError as exc:
            self.problems.add(key, f"{file} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}")
            return None
        if not isinstance(content, dict):
            self.problems.add(key, f"{file} must hold a JSON object ({what}), got {_show(content)}")
            return None
        return content


    def deepspeed_settings(self, config: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
        """Read :data:`DEEPSPEED_KEYS` from a DeepSpeed config; problems name the key (DeepSpeed's
        ``"auto"``, as the transformers integration writes it, counts as not given)."""
        def given(value: Any) -> Any:
            return None if value == "auto" else value

        zero = config.get("zero_optimization") or {}
        if not isinstance(zero, dict):
            self.problems.add(f"{prefix}zero_optimization", f"must be a mapping, got {_show(zero)}")
            return None
        stage = given(zero.get("stage", 0))
        if stage is None:
            stage = 0
        if isinstance(stage, bool) or stage not in _ZERO_STAGES:
            self.problems.add(f"{prefix}zero_optimization.stage", f"unknown ZeRO stage {_show(stage)}; DeepSpeed's "
                                                                  f"stages are {', '.join(map(str, _ZERO_STAGES))}")
            return None
        offload = {}
        for what, name in (("optimizer", "offload_optimizer"), ("parameters", "offload_param")):
            section = zero.get(name) or {}
            device = section.get("device", "none") if isinstance(section, dict) else section
            device = "none" if device is None else device
            if not isinstance(device, str) or device.lower() not in _OFFLOAD_DEVICES:
                self.problems.add(f"{prefix}zero_optimization.{name}.device",
                                  str(unknown_name("offload device", str(device), _OFFLOAD_DEVICES)))
                return None
            offload[what] = device.lower() != "none"
        micro = self.positive_int(f"{prefix}train_micro_batch_size_per_gpu",
                                  given(config.get("train_micro_batch_size_per_gpu")))
        steps = self.positive_int(f"{prefix}gradient_accumulation_steps",
                                  given(config.get("gradient_accumulation_steps")))
        enabled = {}
        for family, names in (("bf16", ("bf16", "bfloat16")), ("16", ("fp16",))):
            section = next((config[n] for n in names if n in config), None)
            flag = given(section.get("enabled")) if isinstance(section, dict) else None
            if flag is not None:
                enabled[family] = self.boolean(f"{prefix}{names[0]}.enabled", flag)
        if enabled.get("bf16") and enabled.get("16"):
            self.problems.add(f"{prefix}bf16.enabled", "bf16 and fp16 are both enabled; DeepSpeed allows one")
            return None
        return {"stage": stage, "offload": offload, "micro_batch": micro, "accumulation": steps, "precision": enabled}

    def deepspeed_name(self, stage: int, offload: Mapping[str, bool], where: str) -> str:
        """memguard's strategy name for a ZeRO stage and its offloads; where none matches exactly, the
        nearest that does not predict too little, with a note."""
        if stage == 0:
            self.notes.append(f"{where}: ZeRO stage 0 shards nothing: modelled as DDP (a full replica per GPU)")
            return "ddp"
        if stage == 3 and offload["optimizer"] and offload["parameters"]:
            return "deepspeed_stage_3_offload"
        if stage == 2 and offload["optimizer"]:
            name = "deepspeed_stage_2_offload"
        else:
            name = f"deepspeed_stage_{stage}"
        ignored = [w for w, on in offload.items() if on and not (name.endswith("_offload") and w == "optimizer")]
        if ignored:
            self.notes.append(f"{where}: offloading the {' and '.join(ignored)} at ZeRO stage {stage} has no memguard "
                              f"model: predicted as {name}, with them on the GPU (an upper bound)")
        return name

    def apply_deepspeed(self, data: dict[str, int | None], trainer: dict[str, Any], section: Mapping[str, Any]) -> None:
        """Merge a DeepSpeed JSON's micro-batch, accumulation and precision with the config's: the JSON
        fills what the config leaves out, and a value both give differently is an error naming both keys
        (the command-line --batch-size still wins, as it does over the file)."""
        ds = self.deepspeed
        if ds is None:
            return
        where = ds["source"]

        def conflict(key: str, mine: Any, theirs: str) -> None:
            self.problems.add(key, f"{_show(mine)} conflicts with {where}: {theirs}; make them agree or drop one")

        micro = ds["micro_batch"]
        if micro is not None:
            source = self.size_keys.get("batch_size")
            if data["batch_size"] is None:
                data["batch_size"] = micro
                self.notes.append(f"batch size {micro}: train_micro_batch_size_per_gpu from {where}")
            elif source and source.startswith("--"):
                if data["batch_size"] != micro:
                    self.notes.append(f"{source} {data['batch_size']} replaces train_micro_batch_size_per_gpu "
                                      f"{micro} from {where}")
            elif data["batch_size"] != micro:
                conflict(source or "data.batch_size", data["batch_size"], f"train_micro_batch_size_per_gpu is {micro}")
        steps = ds["accumulation"]
        if steps is not None:
            if section.get("accumulate_grad_batches") is None:
                trainer["accumulate_grad_batches"] = steps
            elif trainer["accumulate_grad_batches"] != steps:
                conflict("trainer.accumulate_grad_batches", trainer["accumulate_grad_batches"],
                         f"gradient_accumulation_steps is {steps}")
        families = ds["precision"]
        on = next((f for f, flag in families.items() if flag), None)
        if section.get("precision") is None:
            if on is not None:
                trainer["precision"] = "bf16-mixed" if on == "bf16" else "16-mixed"
                self.notes.append(f"precision {trainer['precision']}: {'bf16' if on == 'bf16' else 'fp16'}.enabled "
                                  f"in {where}")
            return
        precision = trainer["precision"]
        if precision is None:
            return  # an invalid precision, already reported
        mine = "bf16" if precision.startswith("bf16") else "16" if precision.startswith("16") else "32"
        if on is not None and mine != on:
            conflict("trainer.precision", precision, f"{'bf16' if on == 'bf16' else 'fp16'}.enabled is true")
        elif on is None and families.get(mine) is False:
            conflict("trainer.precision", precision, f"{'bf16' if mine == 'bf16' else 'fp16'}.enabled is false")

    def lora(self) -> LoraSpec | None:
        lora = self.raw.get("lora")
        if lora is None:
            return None
        if not isinstance(lora, dict):
            self.problems.add("lora", f"must be a mapping like {{r: 16, alpha: 32, target_modules: [q_proj, "
                                      f"v_proj]}}, got {_show(lora)}")
            return None
        self.unknown_keys("lora", lora, SCHEMA["lora"])
        r = self.positive_int("lora.r", lora.get("r")) or 8
        alpha = self.number("lora.alpha", lora.get("alpha"), low=0, high=1e6, low_open=True)
        dropout = self.number("lora.dropout", lora.get("dropout"), low=0, high=0.999)
        targets = lora.get("target_modules")
        if targets is not None and not (isinstance(targets, str) or (
                isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
            self.problems.add("lora.target_modules", f"must be a module name, a list of names or 'all-linear', "
                                                     f"got {_show(targets)}")
            targets = None
        return LoraSpec(r=r, alpha=alpha if alpha is not None else 2 * r,
                        target_modules=tuple(targets) if isinstance(targets, list) else targets,
                        dropout=dropout or 0.0)

    def quantization(self) -> str | None:
        value = self.raw.get("quantization")
        if value is None:
            return None
        parsed = self.name("quantization", value, QuantScheme.parse)
        return str(value).strip().lower() if parsed is not None else None

    def memguard(self) -> dict[str, Any]:
        mg = self.section("memguard")
        self.unknown_keys("memguard", mg, SCHEMA["memguard"])
        out: dict[str, Any] = {"allow": None, "margin": DEFAULT_MARGIN, "fallback": True, "example_batch": None,
                               "zero_grad_before_backward": True}
        if mg.get("allow") is not None:
            out["allow"] = self.knobs("memguard.allow", mg["allow"], KNOBS)
        margin = self.number("memguard.margin", mg.get("margin"), low=0, high=1)
        if margin is not None:
            out["margin"] = margin
        for key in ("fallback", "zero_grad_before_backward"):
            value = self.boolean(f"memguard.{key}", mg.get(key))
            if value is not None:
                out[key] = value
        if mg.get("example_batch") is not None:
            out["example_batch"] = self.tensors("memguard.example_batch", mg["example_batch"])
        return out

    def knobs(self, key: str, value: Any, valid: Sequence[str]) -> tuple[str, ...] | None:
        items = parse_knobs(value) if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(k, str) for k in items):
            self.problems.add(key, f"must be a list of knobs ({', '.join(valid)}), got {_show(value)}")
            return None

        bad = [k for k in items if k not in valid]
        for k in bad:
            self.problems.add(key, str(unknown_name("knob", k, valid)))
        return None if bad else tuple(items)

    def tensors(self, key: str, value: Any) -> Any:
        """A batch described as ``{shape: [...], dtype: ...}`` leaves, alone, in a list or in a mapping."""
        if isinstance(value, dict) and "shape" in value and set(value) <= {"shape", "dtype"}:
            shape = value["shape"]
            if not isinstance(shape, list) or not shape or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
                self.problems.add(f"{key}.shape", f"must be a list of positive sizes, got {_show(shape)}")
                return None
            dtype_name = value.get("dtype", "float32")
            dtype = _DTYPES.get(str(dtype_name).lower()) if isinstance(dtype_name, str) else None
            if dtype is None:
                from memguard.errors import unknown_name

                self.problems.add(f"{key}.dtype", str(unknown_name("dtype", str(dtype_name), _DTYPES)))
                return None
            return torch.empty(shape, dtype=dtype, device="meta")
        if isinstance(value, dict) and value:
            return {k: self.tensors(f"{key}.{k}", v) for k, v in value.items()}
        if isinstance(value, list) and value:
            return tuple(self.tensors(f"{key}[{i}]", v) for i, v in enumerate(value))
        self.problems.add(key, "must be a tensor {shape: [...], dtype: ...}, a list or a mapping of them; "
                               f"got {_show(value)}")
        return None

    def gpus(self, value: Any, key: str) -> tuple[str, ...]:
        if value is None:
            return ()
        names = value if isinstance(value, list) else [value]
        out = []
        for i, name in enumerate(names):
            where = key if not isinstance(value, list) or key.startswith("--") else f"{key}[{i}]"
            entry = self.name(where, name, lookup)
            if entry is not None:
                out.append(entry.name)
        return tuple(out)

    def model(self, model: dict[str, Any]) -> dict[str, Any] | None:
        """Which model, validated as far as possible without building it."""
        if not model:
            if "model" not in self.raw:
                self.problems.add("model", "missing: give model: {preset: NAME}, {hf_config: PATH} or "
                                           "{class_path: ..., init_args: ...}")
            elif not self.problems:
                self.problems.add("model", "is empty")
            return None
        self.unknown_keys("model", model, SCHEMA["model"])
        sources = [k for k in ("preset", "hf_config", "class_path") if model.get(k) is not None]
        if len(sources) != 1:
            self.problems.add("model", "give exactly one of preset, hf_config or class_path" + (
                f" (got {', '.join(sources)})" if sources else
                " (LightningCLI configs without subclass mode name the model class in the script; add class_path)"))
            return None
        source = sources[0]
        if model.get("init_args") is not None and source != "class_path":
            self.problems.add("model.init_args", "applies to class_path only")
        if model.get("num_labels") is not None and source != "preset":
            self.problems.add("model.num_labels", "applies to preset only")
        if source == "preset":
            preset = self.name("model.preset", model["preset"], presets.get)
            num_labels = self.positive_int("model.num_labels", model.get("num_labels"))
            return None if preset is None else {"preset": preset, "num_labels": num_labels}
        if source == "hf_config":
            return self.hf_config(model["hf_config"])
        cls = self.cls("model.class_path", model["class_path"])
        init = model.get("init_args") or {}
        if not isinstance(init, dict):
            self.problems.add("model.init_args", f"must be a mapping, got {_show(init)}")
            return None
        if cls is not None and not issubclass(cls, nn.Module):
            self.problems.add("model.class_path", f"{model['class_path']!r} is not a torch.nn.Module")
            return None
        return None if cls is None else {"class": cls, "init_args": init, "path": model["class_path"]}

    def hf_config(self, value: Any) -> dict[str, Any] | None:
        key = "model.hf_config"
        if not isinstance(value, str):
            self.problems.add(key, f"must be a path to a config.json, got {_show(value)}")
            return None
        file = Path(value) if self.kind == "hf-config" else (self.dir / value)
        if not file.is_file():
            self.problems.add(key, f"no such file: {file}")
            return None
        content = self.json_object(file, key, "a transformers config.json")
        if content is None:
            return None
        if not isinstance(content.get("model_type"), str):
            self.problems.add(key, f"{file} is not a transformers config.json (it has no \"model_type\")")
            return None
        return {"hf_config": content, "file": file}

    def optimizer(self) -> dict[str, Any] | None:
        """A catalog name, ``{name: ..., **kwargs}`` or ``{class_path, init_args}``; None: not given."""

        value = self.raw.get("optimizer")
        if value is None:
            return None
        if isinstance(value, str):
            row = self.name("optimizer", value, optimizers.entry)
            return None if row is None else {"optimizer": row.name, "kwargs": {}, "label": row.name}
        if not isinstance(value, dict):
            self.problems.add("optimizer", f"must be a name or a mapping, got {_show(value)}")
            return None
        if "class_path" in value:
            self.unknown_keys("optimizer", value, ("class_path", "init_args"))  # OPTIMIZER_KEYS' class form
            kwargs = value.get("init_args") or {}
            if not isinstance(kwargs, dict):
                self.problems.add("optimizer.init_args", f"must be a mapping, got {_show(kwargs)}")
                return None
            cls = self.cls("optimizer.class_path", value["class_path"])
            if cls is None:
                return None
            return self.optimizer_class(cls, kwargs, "optimizer.class_path")
        if "name" not in value:
            self.problems.add("optimizer", "a mapping needs name (a catalog optimizer) or class_path")
            return None
        kwargs = {k: v for k, v in value.items() if k != "name"}
        row = self.name("optimizer.name", value["name"], optimizers.entry)
        return None if row is None else {"optimizer": row.name, "kwargs": kwargs, "label": row.name}

    def optimizer_class(self, cls: type, kwargs: dict[str, Any], key: str) -> dict[str, Any] | None:
        row = optimizers.entry_for_class(cls)
        if row is not None:
            return {"optimizer": row.name, "kwargs": kwargs, "label": row.name}
        if not issubclass(cls, torch.optim.Optimizer):
            self.problems.add(key, f"{cls.__module__}.{cls.__qualname__} is not a torch.optim.Optimizer")
            return None
        return {"optimizer": cls, "kwargs": kwargs, "label": f"{cls.__module__}.{cls.__qualname__}"}

    def options(self) -> dict[str, Any]:
        """The command-line options, validated like the file's values and reported under their flags."""

        o, out = self.opts, {}
        with self.problems.from_command_line():
            if o.gpus:
                out["gpus"] = self.gpus(list(o.gpus), "--gpu")
            if o.devices is not None:
                out["devices"] = self.positive_int("--devices", o.devices)
            if o.num_nodes is not None:
                out["num_nodes"] = self.positive_int("--num-nodes", o.num_nodes)
            if o.allow is not None:
                knobs = parse_knobs(o.allow) if isinstance(o.allow, str) else list(o.allow)
                out["allow"] = self.knobs("--allow", knobs, KNOBS)
            if o.margin is not None:
                out["margin"] = self.number("--margin", o.margin, low=0, high=1)
            if o.fallback is not None:
                out["fallback"] = o.fallback
        return out

    def data_key(self, key: str) -> str:
        """Where a data size came from, to name it in a problem: the option when given, else the file."""
        return f"--{key.replace('_', '-')}" if getattr(self.opts, key) is not None else f"data.{key}"

    # -- building -----------------------------------------------------------------------------------------

    def build(self, model: dict[str, Any], data: dict[str, int | None], trainer: dict[str, Any],
              lora: LoraSpec | None, quantization: str | None, mg: dict[str, Any], gpus: tuple[str, ...],
              optimizer: dict[str, Any] | None) -> CheckSpec | None:
        """Build the model on meta and the example batch; problems found here are reported like the rest."""

        loss_fn = None
        if "preset" in model:
            label, factory, batch = self.preset_model(model, data, mg["example_batch"])
        elif "hf_config" in model:
            label, factory, batch = self.hf_model(model, data, mg["example_batch"])
        else:
            label, factory, batch, loss_fn = self.class_model(model, data, mg["example_batch"])
        if factory is None:
            return None
        if lora is not None:
            factory = _cached(_with_lora(factory, lora, self.problems))
        try:
            instance = factory()
        except _Reported:
            return None
        if optimizer is None:
            optimizer = self.configured_optimizer(instance)
            if optimizer is None:
                return None
        if batch is None:
            return None
        if trainer["devices"] is _MISSING:
            return None
        name = optimizer["optimizer"] if isinstance(optimizer["optimizer"], str) else optimizer["label"]
        training = TrainingConfig(
            precision=trainer["precision"],
            optimizer=name,
            micro_batch_size=batch_size_of(batch),
            accumulate_grad_batches=trainer["accumulate_grad_batches"],
            gradient_checkpointing=bool(trainer["gradient_checkpointing"]),
        )
        return CheckSpec(
            path=str(self.path), kind=self.kind, model_label=label, model_factory=factory, batch=batch,
            loss_fn=loss_fn, training=training, optimizer=optimizer["optimizer"],
            optimizer_kwargs=dict(optimizer["kwargs"]), gradient_checkpointing=trainer["gradient_checkpointing"],
            zero_grad_before_backward=mg["zero_grad_before_backward"], quantization=quantization, lora=lora,
            gpus=gpus, devices=trainer["devices"], num_nodes=trainer["num_nodes"], strategy=trainer["strategy"],
            allow=mg["allow"], margin=mg["margin"], fallback=mg["fallback"], notes=self.notes,
        )

    def preset_model(self, model: dict[str, Any], data: dict[str, int | None], given: Any) -> tuple:
        preset = model["preset"]
        if given is not None:
            batch = given
        else:
            batch = self.preset_batch(preset, data)
        factory = _cached(self.guarded("model.preset", lambda: presets.build(preset, num_labels=model["num_labels"])))
        return preset.name, factory, batch

    def preset_batch(self, preset: Any, data: dict[str, int | None]) -> Any:
        batch_size = data["batch_size"] or 1
        if data["batch_size"] is None:
            self.notes.append("data.batch_size not given: 1")
        if preset.input == "image":
            if data["seq_len"] is not None:
                self.problems.add("data.seq_len", f"{preset.name!r} takes images: give data.image_size, not seq_len")
                return None
        else:
            if data["image_size"] is not None:
                self.problems.add("data.image_size", f"{preset.name!r} takes tokens: give data.seq_len, not "
                                                     "image_size")
                return None
            if data["seq_len"] is None:
                self.notes.append(f"data.seq_len not given: {preset.seq_len}, the length {preset.name} was "
                                  "pre-trained with")
            limit = _positions(preset.hyperparameters)
            if data["seq_len"] is not None and limit is not None and data["seq_len"] > limit:
                self.problems.add(self.data_key("seq_len"), f"{data['seq_len']} is longer than {preset.name}'s "
                                                            f"{limit} positions")
                return None
        try:
            return presets.example_batch(preset, batch_size, data["seq_len"], data["image_size"])
        except InvalidArgumentError as exc:
            self.problems.add("data", str(exc))
            return None

    def hf_model(self, model: dict[str, Any], data: dict[str, int | None], given: Any) -> tuple:
        content, file = dict(model["hf_config"]), model["file"]
        key = "model.hf_config"
        try:
            import transformers
        except ImportError:
            self.problems.add(key, "a config.json needs transformers: pip install 'memguard[transformers]'")
            return None, None, None
        model_type = content.pop("model_type")
        if model_type not in transformers.CONFIG_MAPPING:
            self.problems.add(key, str(unknown_name("model_type", model_type, list(transformers.CONFIG_MAPPING))))
            return None, None, None
        try:
            config = transformers.AutoConfig.for_model(model_type, **content)
        except Exception as exc:  # noqa: BLE001 - a config transformers cannot read
            self.problems.add(key, f"transformers cannot read {file}: {_first_line(exc)}")
            return None, None, None
        arch = next(iter(content.get("architectures") or []), None)
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if cls is None:
            try:
                cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
            except KeyError:
                self.problems.add(key, f"transformers has no causal-LM class for model_type {model_type!r}; "
                                       f"add \"architectures\": [\"...\"] to {file}")
                return None, None, None
        label = f"{cls.__name__} from {self.source_label or file.name}"
        batch = given if given is not None else self.hf_batch(cls.__name__, config, data)

        def build() -> nn.Module:
            with torch.device("meta"):
                return cls(config)  # float32 like Model(config); the training precision is trainer.precision

        return label, _cached(self.guarded(key, build)), batch

    def hf_batch(self, class_name: str, config: Any, data: dict[str, int | None]) -> Any:
        batch_size = data["batch_size"] or 1
        if data["batch_size"] is None:
            self.notes.append("batch size not given (data.batch_size or --batch-size): 1")
        if class_name.endswith("ForImageClassification"):
            size = data["image_size"] or getattr(config, "image_size", None)
            if not isinstance(size, int):
                self.problems.add("data.image_size", "required for this model (its config has no image_size)")
                return None
            channels = getattr(config, "num_channels", 3)
            return {"pixel_values": torch.empty(batch_size, channels, size, size, device="meta"),
                    "labels": torch.zeros(batch_size, dtype=torch.long, device="meta")}
        limit = _positions(config.to_dict())
        seq_len = data["seq_len"]
        if seq_len is None:
            if limit is None:
                self.problems.add("data.seq_len", "required for this model (its config has no "
                                                  "max_position_embeddings): pass --seq-len")
                return None
            seq_len = min(limit, _MAX_DEFAULT_SEQ_LEN)
            self.notes.append(f"sequence length not given (data.seq_len or --seq-len): {seq_len}, from the "
                              "model's position table")
        elif limit is not None and seq_len > limit:
            self.problems.add(self.data_key("seq_len"), f"{seq_len} is longer than the model's {limit} positions")
            return None
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
        labels = torch.zeros(batch_size, dtype=torch.long, device="meta") if class_name.endswith(
            "ForSequenceClassification") else torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
        return {"input_ids": ids, "labels": labels}

    def class_model(self, model: dict[str, Any], data: dict[str, int | None], given: Any) -> tuple:
        cls, init, path = model["class"], model["init_args"], model["path"]
        lightning = _is_lightning_module(cls)

        def build() -> nn.Module:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls(**_instantiate(init, self.dir))

        factory = _cached(self.guarded("model.class_path", build, what=f"building {path} on the meta device"))
        if given is not None:
            loss_fn = _training_step_loss if lightning else None
            return cls.__name__, factory, given, loss_fn
        try:
            instance = factory()
        except _Reported:
            return cls.__name__, None, None, None
        example = getattr(instance, "example_input_array", None)
        if example is None:
            self.problems.add("memguard.example_batch", f"{cls.__name__} has no example_input_array: describe a "
                                                        "training batch here ({shape: [...], dtype: ...} tensors)")
            return cls.__name__, None, None, None
        batch = self.resized(example, data, cls.__name__)
        return cls.__name__, factory, batch, _forward_loss

    def resized(self, example: Any, data: dict[str, int | None], owner: str) -> Any:
        """``example_input_array`` on meta, its sizes replaced by the data hints: batch_size is every tensor's
        first dimension, seq_len the second of (batch, tokens) integer tensors, image_size the last two of
        (batch, channels, height, width) float tensors."""
        changed: list[str] = []

        def resize(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            shape = list(x.shape)
            if data["batch_size"] and shape:
                shape[0] = data["batch_size"]
            if data["seq_len"] and len(shape) == 2 and not x.is_floating_point():
                shape[1] = data["seq_len"]
            if data["image_size"] and len(shape) == 4 and x.is_floating_point():
                shape[2] = shape[3] = data["image_size"]
            if shape != list(x.shape):
                changed.append(f"{tuple(x.shape)} -> {tuple(shape)}")
            return torch.empty(shape, dtype=x.dtype, device="meta")

        batch = tree_map(resize, example)
        source = f"{owner}.example_input_array"
        if changed:
            self.notes.append(f"example batch: {source} resized by the data hints ({', '.join(changed)})")
        self.notes.append(f"the step is traced as forward({source}) with the sum of its outputs as the loss; "
                          "add memguard.example_batch to trace training_step with a real batch")
        return batch

    def configured_optimizer(self, instance: nn.Module) -> dict[str, Any] | None:
        """No ``optimizer:`` given: a LightningModule's own ``configure_optimizers``, else AdamW."""
        if not hasattr(instance, "configure_optimizers") or not _is_lightning_module(type(instance)):
            self.notes.append("no optimizer given: adamw")
            return {"optimizer": "adamw", "kwargs": {}, "label": "adamw"}
        owner = type(instance).__name__
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                configured = instance.configure_optimizers()
        except Exception as exc:  # noqa: BLE001 - it may need a Trainer memguard does not have
            self.problems.add("optimizer", f"not given, and {owner}.configure_optimizers() failed without a "
                                           f"Trainer ({type(exc).__name__}: {_first_line(exc)}); give optimizer: "
                                           "{class_path: ..., init_args: ...}")
            return None
        found = first_optimizer(configured)
        if found is None:
            self.problems.add("optimizer", f"not given, and {owner}.configure_optimizers() returned no optimizer")
            return None
        kwargs = {k: v for k, v in found.defaults.items() if v is not None and k != "params"}
        self.notes.append(f"optimizer from {owner}.configure_optimizers(): {type(found).__name__}")
        return self.optimizer_class(type(found), kwargs, "optimizer")

    def guarded(self, key: str, build: Callable[[], nn.Module],
                what: str = "building the model") -> Callable[[], nn.Module]:
        """Run ``build``; a failure becomes a problem under ``key`` (and :class:`_Reported` stops the build)."""

        def run() -> nn.Module:
            try:
                return build()
            except InvalidArgumentError as exc:
                self.problems.add(key, str(exc))
            except ImportError as exc:
                self.problems.add(key, str(exc))
            except Exception as exc:  # noqa: BLE001 - the user's constructor may raise anything
                self.problems.add(key, f"{what} failed: {type(exc).__name__}: {_first_line(exc)}")
            raise _Reported

        return run


class _Reported(Exception):
    """A problem was already recorded; unwind the build without another message."""


def _with_lora(factory: Callable[[], nn.Module], lora: LoraSpec, problems: _Problems) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = factory()
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            problems.add("lora", "LoRA needs peft: pip install 'memguard[transformers]'")
            raise _Reported from None
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(lora.target_modules) if isinstance(lora.target_modules, tuple)
                            else lora.target_modules)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return get_peft_model(model, config)
        except Exception as exc:  # noqa: BLE001 - peft's errors name the modules it could not find
            problems.add("lora.target_modules", f"peft could not add adapters: {_first_line(exc)}")
            raise _Reported from None

    return build


def _instantiate(value: Any, config_dir: Path) -> Any:
    """Nested ``{class_path, init_args}`` values built as LightningCLI builds them (on the caller's device)."""
    if isinstance(value, dict) and "class_path" in value and set(value) <= {"class_path", "init_args"}:
        cls = import_class(value["class_path"], config_dir)
        return cls(**_instantiate(value.get("init_args") or {}, config_dir))
    if isinstance(value, dict):
        return {k: _instantiate(v, config_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_instantiate(v, config_dir) for v in value]
    return value


def _is_lightning_module(cls: type) -> bool:
    """Whether ``cls`` derives from either Lightning package's LightningModule, without importing Lightning."""
    packages = ("lightning", "pytorch_lightning")
    return any(base.__name__ == "LightningModule" and base.__module__.split(".")[0] in packages for base in cls.__mro__)


def _training_step_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A LightningModule's own step on the example batch (logging is silenced: there is no Trainer)."""
    for name in ("log", "log_dict", "print"):
        if hasattr(model, name):
            setattr(model, name, lambda *a, **k: None)
    out = model.training_step(batch, 0)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise InvalidArgumentError("training_step returned no loss tensor (manual optimization is not supported "
                                   "by memguard check)")
    return out


def _forward_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``forward(example_input_array)`` as Lightning calls it, summed into a scalar to backpropagate."""
    out = model(*batch) if isinstance(batch, tuple) else model(batch)
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise InvalidArgumentError(f"{type(model).__name__}.forward returned no floating-point tensor to "
                                   "backpropagate; add memguard.example_batch to trace training_step")
    return sum(t.float().sum() for t in leaves)


def _positions(hyperparameters: Mapping[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = hyperparameters.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_knobs(text: str) -> list[str]:
    """``"precision,optimizer"`` -> ``["precision", "optimizer"]``; an empty string allows no knob."""
    return [k.strip() for k in text.split(",") if k.strip()]


__all__ = ["CheckSpec", "ConfigError", "LoraSpec", "Options", "Problem", "SCHEMA", "load_config"]
