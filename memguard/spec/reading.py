"""Reading a config file: OmegaConf (safe YAML, ``${...}`` interpolation), ``--set`` overrides and size
flags merged into the raw tree, Hub ids, and importing ``class_path`` entries."""

from __future__ import annotations


import contextlib
import importlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


from memguard import hub
from memguard.errors import InvalidArgumentError, closest
from memguard.spec.check_spec import Options
from memguard.spec.problems import _Problems
from memguard.spec.schema import _DATA_HINTS


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
        top, node = _composed(path)
        if top not in ("mapping", "empty", "unreadable"):
            problems.add("", f"the top level must be a mapping of sections (model:, data:, trainer: ...), not {top}")
            return None
        try:
            cfg = _load_yaml(path, node)
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


MAX_YAML_NODES = 5_000_000
"""Nodes a config may have once its aliases are expanded. OmegaConf's default (10,000) refuses large plain
files (a config with many ignored keys); its other guard, against aliases that expand a file more than a
hundredfold (the "billion laughs"), stays on."""


def _load_yaml(path: Path, node: Any) -> Any:
    """The file as OmegaConf reads it. When a section memguard never reads (:data:`IGNORED_TOP_LEVEL`) has
    content, OmegaConf reads the document without it (``node``, composed by libyaml, re-emitted with the
    section empty): OmegaConf's own YAML reading is pure Python and takes seconds per ten thousand keys."""
    import yaml
    from omegaconf import OmegaConf

    from memguard.spec.schema import IGNORED_TOP_LEVEL

    if isinstance(node, yaml.MappingNode) and any(
            isinstance(k, yaml.ScalarNode) and k.value in IGNORED_TOP_LEVEL for k, _ in node.value):
        node.value = [(k, yaml.ScalarNode("tag:yaml.org,2002:null", "null"))
                      if isinstance(k, yaml.ScalarNode) and k.value in IGNORED_TOP_LEVEL else (k, v)
                      for k, v in node.value]
        text = yaml.serialize(node, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))
        return OmegaConf.create(text)
    try:
        return OmegaConf.load(path, max_yaml_expanded_nodes=MAX_YAML_NODES)
    except TypeError:  # an OmegaConf without alias limits (before 2.4)
        return OmegaConf.load(path)


def _composed(path: Path) -> tuple[str, Any]:
    """The file's top-level YAML node, composed by libyaml without constructing anything (aliases are not
    expanded), and what it is: "mapping", "a list", "a plain string or number", "empty", or "unreadable"
    when YAML cannot parse it (the loader then says why, with the line)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            node = yaml.compose(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except Exception:  # noqa: BLE001 - reported by the loader with its line and column
        return "unreadable", None
    if node is None:
        return "empty", None
    if isinstance(node, yaml.MappingNode):
        return "mapping", node
    return ("a list" if isinstance(node, yaml.SequenceNode) else "a plain string or number"), node


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
