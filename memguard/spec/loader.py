"""Validating the raw config tree section by section into the pieces of a :class:`CheckSpec`; every problem
is recorded (file, key, closest valid values) and loading goes on, so one run reports them all."""

from __future__ import annotations

import dataclasses


import contextlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from memguard import optimizers, validation
from memguard.errors import InvalidArgumentError, closest, unknown_name
from memguard.device.catalog import lookup
from memguard.plan import DEFAULT_MARGIN, KNOBS
from memguard.precision import parse_lightning
from memguard.quantization import QuantScheme
from memguard.trace.compiled import CompileSpec
from memguard.spec.building import _Building, _show
from memguard.spec.check_spec import CheckSpec, LoraSpec, Options
from memguard.spec.problems import _Problems
from memguard.spec.reading import import_class
from memguard import strategies
from memguard.spec.schema import LIGHTNING_TRAINER_ARGS, SCHEMA, STRATEGY_KEYS, TOP_LEVEL, _DATA_HINTS, _DTYPES, _MISSING, _OFFLOAD_DEVICES, _ZERO_STAGES


class _Loader(_Building):
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
        self.tp_sizes: tuple[int | None, int | None, str] | None = None
        """A tensor-parallel strategy's (tensor, data) parallel sizes and the key they came from."""

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

    def checked(self, key: str, check: Callable[..., Any], value: Any, **kwargs: Any) -> Any:
        """``check(value, key, ...)`` from :mod:`memguard.validation`; its error becomes a problem at ``key``."""
        try:
            return check(value, key, **kwargs)
        except InvalidArgumentError as exc:
            message = str(exc)
            for lead in (key + ": ", key + " "):
                message = message[len(lead):] if message.startswith(lead) else message
            self.problems.add(key, message)
            return None

    def positive_int(self, key: str, value: Any) -> int | None:
        return None if value is None else self.checked(key, validation.positive_int, value)

    def number(self, key: str, value: Any, *, low: float, high: float, low_open: bool = False) -> float | None:
        return None if value is None else self.checked(key, validation.number, value, low=low, high=high,
                                                       low_open=low_open)

    def boolean(self, key: str, value: Any) -> bool | None:
        if value is None or isinstance(value, bool):
            return value
        self.problems.add(key, f"must be true or false, got {_show(value)}")
        return None


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
        compiled = self.compile()
        if self.problems or model is None:
            return None
        spec = self.build(model, data, trainer, lora, quantization, mg, gpus, optimizer)
        return dataclasses.replace(spec, compile=compiled) if spec is not None and compiled else spec

    def compile(self) -> CompileSpec | None:
        """``compile:`` (or ``trainer.compile:``): the run compiles the whole model with torch.compile."""
        key = "compile" if "compile" in self.raw else "trainer.compile"
        value = self.raw.get("compile", self.trainer_section.get("compile"))
        try:
            return CompileSpec.parse(value, where=key)
        except InvalidArgumentError as exc:
            self.problems.add(key, str(exc).removeprefix(key).lstrip(": "))
            return None

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
            self.name("trainer.precision", precision, parse_lightning))
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
            if "name" in value:
                return self.named_strategy(key, value)
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
            name = strategies.from_class_name(short)
            if name is None:
                self.problems.add(f"{key}.class_path", f"memguard does not know the strategy class {short!r}. "
                                                       f"Known: {', '.join(sorted(strategies.CLASS_NAMES))}.")
                return "auto"
            init = value.get("init_args") or {}
            if not isinstance(init, dict):
                self.problems.add(f"{key}.init_args", f"must be a mapping, got {_show(init)}")
                return "auto"
            if name == "model_parallel":
                self.parallel_sizes(f"{key}.init_args", init)
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
        row = strategies.find(value) if isinstance(value, str) else None
        if row is None:
            self.problems.add(key, str(unknown_name("strategy", str(value), strategies.names())))
            return "auto"
        return row.name

    def named_strategy(self, key: str, value: dict[str, Any]) -> str:
        """``{name: tp, tensor_parallel_size: 4}``: a table name with the tensor-parallel sizes beside it."""
        row = strategies.find(value["name"]) if isinstance(value["name"], str) else None
        if row is None:
            self.problems.add(f"{key}.name", str(unknown_name("strategy", str(value["name"]), strategies.names())))
            return "auto"
        extra = sorted(set(value) - {"name", "tensor_parallel_size", "data_parallel_size"})
        if extra:
            self.problems.add(f"{key}.{extra[0]}", "a {name: ...} strategy mapping takes only tensor_parallel_size and "
                                                   "data_parallel_size beside the name")
        if row.kind is not strategies.Kind.TP and {"tensor_parallel_size", "data_parallel_size"} & set(value):
            self.problems.add(key, f"tensor_parallel_size / data_parallel_size need a tensor-parallel strategy "
                                   f"(tp, model_parallel), not {row.name!r}")
        self.parallel_sizes(key, value)
        return row.name

    def parallel_sizes(self, key: str, args: Mapping[str, Any]) -> None:
        """ModelParallelStrategy's sizes ("auto" or a positive int each), kept for the spec."""
        sizes: dict[str, int | None] = {}
        for name in ("tensor_parallel_size", "data_parallel_size"):
            value = args.get(name, "auto")
            sizes[name] = None if value in ("auto", None) else self.positive_int(f"{key}.{name}", value)
        self.tp_sizes = (sizes["tensor_parallel_size"], sizes["data_parallel_size"], key)

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
        margin = None if mg.get("margin") is None else self.checked("memguard.margin", validation.margin, mg["margin"])
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
        return self.checked(key, validation.names, value, valid=valid, kind="knob")

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
                out["allow"] = self.knobs("--allow", o.allow, KNOBS)
            if o.margin is not None:
                out["margin"] = self.checked("--margin", validation.margin, o.margin)
            if o.fallback is not None:
                out["fallback"] = o.fallback
        return out

    def data_key(self, key: str) -> str:
        """Where a data size came from, to name it in a problem: the option when given, else the file."""
        return f"--{key.replace('_', '-')}" if getattr(self.opts, key) is not None else f"data.{key}"

    # -- building -----------------------------------------------------------------------------------------
