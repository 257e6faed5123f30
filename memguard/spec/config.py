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

:func:`load_config` gives the :class:`CheckSpec` that :func:`memguard.act.check.run_check` checks; nothing here
prints, estimates or touches a GPU.
"""

from __future__ import annotations


import os
from collections.abc import Sequence
from pathlib import Path


from memguard.spec.check_spec import CheckSpec, Options
from memguard.spec.loader import _Loader
from memguard.spec.problems import _Problems
from memguard.spec.reading import _hub_base, _hub_model, _kind, _option_overrides, _read


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
