"""What a memguard config may say: every key per section with its meaning (the README's config reference is
checked against these tables), and the values some keys accept."""

from __future__ import annotations



import torch



# ---------------------------------------------------------------------------------------------------------
# The schema


_MISSING = object()

SCHEMA: dict[str, dict[str, str]] = {
    "model": {
        "preset": "a memguard preset name (memguard.presets.names())",
        "hf_config": "a transformers config.json, relative to the config file",
        "class_path": "an importable nn.Module or LightningModule class, built on the meta device",
        "init_args": "keyword arguments of class_path (nested class_path entries: torch modules and the classes its signature asks for)",
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
        "compile": "the same as the top-level compile: key",
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

TOP_LEVEL = ("model", "data", "optimizer", "trainer", "gpu", "lora", "quantization", "compile", "memguard",
             "lr_scheduler", "seed_everything", "ckpt_path")
"""Top-level keys: memguard's own plus LightningCLI's (``lr_scheduler``, ``seed_everything`` and
``ckpt_path`` are accepted and do not change memory)."""

IGNORED_TOP_LEVEL = ("lr_scheduler", "seed_everything", "ckpt_path")
"""LightningCLI's top-level keys that do not change memory: their contents are never read."""

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

STRATEGY_KEYS = {
    "deepspeed_config": "a DeepSpeed JSON config (path relative to the config file, or a mapping)",
    "class_path": "a Lightning strategy class (DDPStrategy, FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy ...)",
    "init_args": "its arguments; DeepSpeedStrategy's config (a JSON path or a mapping), stage, offload_optimizer "
                 "and offload_parameters are read; ModelParallelStrategy's data_parallel_size and "
                 "tensor_parallel_size",
    "name": "a strategy name, for the mapping form {name: tp, tensor_parallel_size: 4}",
    "tensor_parallel_size": "ranks per tensor-parallel group (tp / model_parallel; default: the devices of a node)",
    "data_parallel_size": "data-parallel groups (tp / model_parallel; default: the ranks / tensor_parallel_size)",
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
