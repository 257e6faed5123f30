"""Building what a config describes on the meta device: the model (a preset, a transformers config, an
importable class, with LoRA), its example batch, the loss a LightningModule computes, and the optimizer
it configures."""

from __future__ import annotations


import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from memguard import presets
from memguard.optimizers import first_optimizer
from memguard.errors import InvalidArgumentError, closest, unknown_name
from memguard.plan import TrainingConfig, batch_size_of
from memguard.spec.check_spec import CheckSpec, LoraSpec, _cached
from memguard.spec.problems import _Problems
from memguard.spec.reading import _first_line, import_class
from memguard.spec.schema import SCHEMA, _MAX_DEFAULT_SEQ_LEN, _MISSING
from memguard.losses import forward_sum_loss, training_step_loss




class _Building:
    """The part of the loader that builds: the model (preset, transformers config, class), its example
    batch, LoRA, and the optimizer a LightningModule configures. Mixed into :class:`_Loader`."""

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
        if cls is not None and not self.nested_classes_allowed(init, cls, "model.init_args"):
            return None
        return None if cls is None else {"class": cls, "init_args": init, "path": model["class_path"]}

    def nested_classes_allowed(self, init: Mapping[str, Any], owner: type, key: str) -> bool:
        """Every ``{class_path, init_args}`` nested in ``init`` names a class memguard may build: a torch
        module, or a class the owner's own signature asks for at that argument (its annotation). Anything
        else (``subprocess.Popen``...) is a problem at its key, found before anything is built. Importing a
        class path runs its module's top-level code, as LightningCLI does."""
        ok = True
        for name, value in init.items():
            ok &= self.nested_value_allowed(value, _annotation(owner, name), f"{key}.{name}")
        return ok

    def nested_value_allowed(self, value: Any, expected: Any, key: str) -> bool:
        if isinstance(value, dict) and "class_path" in value and set(value) <= {"class_path", "init_args"}:
            cls = self.cls(f"{key}.class_path", value["class_path"])
            if cls is None:
                return False
            if not (issubclass(cls, nn.Module) or _asked_for(cls, expected)):
                self.problems.add(f"{key}.class_path", f"memguard builds only torch modules and the classes the "
                                                       f"model's own signature asks for; {value['class_path']!r} is "
                                                       "neither, so it is not built")
                return False
            init = value.get("init_args") or {}
            if not isinstance(init, dict):
                self.problems.add(f"{key}.init_args", f"must be a mapping, got {_show(init)}")
                return False
            return self.nested_classes_allowed(init, cls, f"{key}.init_args")
        if isinstance(value, dict):
            return all([self.nested_value_allowed(v, None, f"{key}.{k}") for k, v in value.items()])
        if isinstance(value, list):
            return all([self.nested_value_allowed(v, None, f"{key}[{i}]") for i, v in enumerate(value)])
        return True

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
        sizes = self.tensor_parallel(instance, trainer)
        if sizes is None:
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
            tensor_parallel_size=sizes[1], data_parallel_size=sizes[0],
        )

    def tensor_parallel(self, instance: nn.Module, trainer: dict[str, Any]) -> tuple[int | None, int | None] | None:
        """(data-parallel, tensor-parallel) sizes of a tensor-parallel strategy, checked against the ranks and
        the model's attention heads ((None, None) for other strategies); None after a problem."""
        from memguard import strategies
        from memguard.estimation.strategy_options import TPOptions
        from memguard.estimation.tensor_parallel import head_counts

        row = strategies.find(trainer["strategy"])
        if row is None or row.kind is not strategies.Kind.TP:
            return None, None
        tp, dp, key = getattr(self, "tp_sizes", None) or (None, None, "trainer.strategy")
        if trainer["devices"] is None:  # decided at run time
            return dp, tp
        world = trainer["devices"] * trainer["num_nodes"]
        where = f"{key}.tensor_parallel_size"
        try:
            dp, tp = TPOptions(tp, dp).sizes(world, trainer["num_nodes"])
        except InvalidArgumentError as exc:
            self.problems.add(where if "tensor_parallel_size (" in str(exc) else key, str(exc))
            return None
        for attr, heads in head_counts(instance).items():
            if heads % tp:
                fits = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0 and world % d == 0)
                self.problems.add(where, f"{tp} does not divide the model's {attr} ({heads}): each rank computes "
                                         f"whole heads; sizes that divide both the heads and the {world} ranks: {fits}")
                return None
        return dp, tp

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
            loss_fn = _config_training_step_loss if lightning else None
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
        return cls.__name__, factory, batch, forward_sum_loss

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
            problems.add("lora.target_modules", f"peft could not add adapters: {_first_line(exc)}"
                                                f"{_target_hint(model, lora.target_modules)}")
            raise _Reported from None

    return build


def _target_hint(model: nn.Module, targets: Any) -> str:
    """For each LoRA target that names no module of ``model``, the module names closest to it."""
    if not isinstance(targets, (tuple, list)):
        return ""
    leaves = sorted({name.rpartition(".")[2] for name, _ in model.named_modules() if name})
    hints = []
    for target in targets:
        if isinstance(target, str) and target not in leaves:
            near = closest(target, leaves)
            if near:
                hints.append(f"{target!r}: did you mean {', '.join(repr(n) for n in near)}?")
    return (" " + "; ".join(hints)) if hints else ""


def _annotation(owner: type, name: str) -> Any:
    """The annotation of ``owner.__init__``'s argument ``name`` (None when it has none)."""
    import inspect
    import typing

    try:
        return typing.get_type_hints(owner.__init__).get(name)
    except Exception:  # noqa: BLE001 - unresolvable forward references: the raw annotation, if a class
        parameter = inspect.signature(owner.__init__).parameters.get(name) if callable(owner.__init__) else None
        raw = getattr(parameter, "annotation", None)
        return raw if isinstance(raw, type) else None


def _asked_for(cls: type, expected: Any) -> bool:
    """``cls`` is (a subclass of) a class named by the annotation ``expected`` (``X``, ``X | None``,
    ``Optional[X]``, ``list[X]``...); ``object`` and ``Any`` ask for nothing in particular."""
    import typing

    if expected is None or expected is object or expected is typing.Any:
        return False
    if isinstance(expected, type):
        return expected is not object and issubclass(cls, expected)
    return any(_asked_for(cls, arg) for arg in typing.get_args(expected))


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


def _config_training_step_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return training_step_loss(model, batch, instead="memguard check cannot trace manual optimization")


def _positions(hyperparameters: Mapping[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = hyperparameters.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
