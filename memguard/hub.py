"""A Hugging Face Hub id (``meta-llama/Llama-2-7b-hf``) as ``memguard check``'s input, resolved offline.

memguard never downloads: the model's ``config.json`` is taken from the local Hugging Face cache (where
``from_pretrained`` or ``hf download`` left it), else the architecture comes from a memguard preset whose
name or Hub id matches (:func:`memguard.presets.get`). The cache is the one huggingface_hub uses, located
from the environment at call time (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``), so a test or a job script that sets
those variables is followed even after huggingface_hub was imported.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from memguard import presets
from memguard.errors import InvalidArgumentError, closest

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class HubModel:
    """Where a Hub id's architecture comes from: a cached ``config.json`` or a preset (one of the two)."""

    repo_id: str
    config_json: Path | None = None
    preset: str | None = None


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` or a bare ``name`` that is not a file and does not end like a config file: a
    missing ``examples/typo.yaml`` stays a missing file."""
    return (_HUB_ID.match(text) is not None and not text.lower().endswith(_CONFIG_SUFFIXES)
            and not Path(text).exists())


def cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub computes it from the environment."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        home = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def cached_config(repo_id: str, cache: Path | None = None) -> Path | None:
    """The cached ``config.json`` of ``repo_id`` at the revision ``refs/main`` points to, or None; never
    touches the network. Uses huggingface_hub's own lookup where it is installed."""
    cache = cache_dir() if cache is None else cache
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return _cached_config_by_hand(repo_id, cache)
    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache))
    except Exception:  # noqa: BLE001 - an id huggingface_hub rejects is simply not cached
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _cached_config_by_hand(repo_id: str, cache: Path) -> Path | None:
    """The standard cache layout, ``models--org--name/snapshots/<refs/main>/config.json``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    found = repo / "snapshots" / ref.read_text().strip() / "config.json"
    return found if found.is_file() else None


def resolve(repo_id: str) -> HubModel:
    """The cached ``config.json`` of ``repo_id``, else the preset it names; otherwise an
    :class:`InvalidArgumentError` that says where memguard looked and how to get the file (its text
    follows the id, as in ``memguard: error: org/name: no such file, ...``)."""
    cache = cache_dir()
    found = cached_config(repo_id, cache)
    if found is not None:
        return HubModel(repo_id, config_json=found)
    try:
        return HubModel(repo_id, preset=presets.get(repo_id).name)
    except InvalidArgumentError:
        pass
    near = closest(repo_id.rsplit("/", 1)[-1], presets.names()) or closest(repo_id, presets.names())
    hint = f" Closest presets: {', '.join(near)}." if near else ""
    raise InvalidArgumentError(
        f"no such file, not in the Hugging Face cache (looked for "
        f"models--{repo_id.replace('/', '--')}/snapshots/*/config.json in {cache}) and not a memguard preset "
        f"(memguard presets lists them). memguard never downloads: fetch the config once where there is network, "
        f"with `hf download {repo_id} config.json` (or `huggingface-cli download {repo_id} config.json`), or pass "
        f"the path of its config.json.{hint}")


__all__ = ["HubModel", "cache_dir", "cached_config", "looks_like_hub_id", "resolve"]
