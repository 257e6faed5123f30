"""Which architectures people train can memguard trace, and how exact is it on them.

The architectures are not chosen by hand: every model type of the installed transformers' auto-model
mappings for causal LM, masked LM, seq2seq LM and image classification, plus Lightning's demo models that
train. Each is built from a tiny config derived generically from its config class's defaults (the size-like
attributes of ATTRIBUTE_RULES shrunk; OVERRIDES only where the generic rule cannot work), with the model's
default attention implementation, float32, and a generic batch for its main input.

For each architecture, in a forked child process with a time limit (one bad model cannot stop the sweep):
1. the real CPU peak of two real training steps (AdamW; forward, backward, step, zero_grad), measured by
   tests/groundtruth.py;
2. memguard.estimate(..., device="cpu") on a fresh copy of the same model and batch, timed.

Usage: python benchmarks/coverage.py [--only NAME[,NAME]] [--limit N] [--timeout S] [--output coverage]
       [--results-dir DIR] [--from-json]
NAME is a model type (gpt2), a row id (gpt2/causal-lm) or a Lightning demo (lightning:BoringModel).
Writes benchmarks/results/<output>.md and <output>.json; --from-json rewrites the .md from the .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
import re
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, machine  # noqa: E402
from groundtruth import REAL_OPTIMIZERS, measure_peak  # noqa: E402

BATCH, SEQ = 2, 32
"""Batch size and sequence length of the token batches: small enough for a few seconds per architecture."""
IMAGE_SIZE, PATCH_SIZE = 64, 4
WITHIN = 0.02
"""The accuracy bar of the CPU ground truth (README, Accuracy): a traced architecture counts as exact
within it."""

TASKS = {
    # task: (mapping in transformers.models.auto.modeling_auto, Auto class)
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    "seq2seq-lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
}

# -- tiny configs -----------------------------------------------------------------------------------------

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, POSITIONS, EXPERTS = 64, 128, 2, 4, 2, 16, 512, 128, 4

HEAD_NAMES = ["num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
              "decoder_attention_heads", "num_decoder_attention_heads"]
LAYER_NAMES = ["num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
               "num_encoder_layers", "num_decoder_layers", "decoder_num_layers"]
KV_HEAD_NAMES = ["num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"]

ATTRIBUTE_RULES: dict[str, Callable[[Any], Any]] = {
    # attribute name -> what its (int) default becomes; one rule per meaning, whatever the model calls it
    **dict.fromkeys(["hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "d_embed",
                     "embedding_size", "word_embed_proj_dim", "embedding_dim"], lambda v: HIDDEN),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
                     "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                     "dim_feedforward", "inner_hidden_size", "mlp_dim", "hidden_dim", "decoder_intermediate_size",
                     "linear_units", "expert_intermediate_size", "dense_intermediate_size"], lambda v: FFN),
    **dict.fromkeys(LAYER_NAMES, lambda v: LAYERS),
    **dict.fromkeys(HEAD_NAMES, lambda v: HEADS),
    # kv heads keep the kind of attention: multi-query stays multi-query (multi-head: tiny_overrides)
    **dict.fromkeys(KV_HEAD_NAMES, lambda v: v if v == 1 else KV_HEADS),
    **dict.fromkeys(["head_dim", "v_head_dim", "qk_nope_head_dim", "attention_head_size"], lambda v: HEAD_DIM),
    "qk_rope_head_dim": lambda v: HEAD_DIM,
    "rotary_dim": lambda v: min(v, HEAD_DIM),  # rotated features of one head: at most its size  # some configs alias head_dim to it: the two must agree
    **dict.fromkeys(["kv_lora_rank", "q_lora_rank"], lambda v: 32),
    "vocab_size": lambda v: VOCAB,
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length",
                     "max_target_positions", "max_source_positions", "max_length"], lambda v: POSITIONS),
    "image_size": lambda v: IMAGE_SIZE,
    "patch_size": lambda v: PATCH_SIZE,
    # windowed attention (Swin-like) needs a window no larger than its last stage's resolution
    "window_size": lambda v: min(v, 2),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"],
                    lambda v: min(v, EXPERTS)),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "num_selected_experts", "moe_k",
                     "num_experts_per_token"], lambda v: min(v, 2)),
    "n_shared_experts": lambda v: min(v, 1),
    **dict.fromkeys(["n_group", "topk_group"], lambda v: 1),
    "first_k_dense_replace": lambda v: min(v, 1),
}

LIST_RULES: dict[str, Callable[[int, Any], Any]] = {
    # per-stage lists of hierarchical (vision) models: (stage index, default) -> tiny value
    "depths": lambda i, v: 1,
    "hidden_sizes": lambda i, v: min(v, 16 * 2**i),
    "embed_dim": lambda i, v: min(v, 16 * 2**i),
    "num_heads": lambda i, v: min(v, 2),
    "num_attention_heads": lambda i, v: min(v, 2),
}

OVERRIDES: dict[str, dict[str, Any]] = {
    # model type -> settings the generic rules cannot derive; each says why
    # its default has no attention layer at all (every layer Mamba), and transformers' causal-mask code
    # then fails before the first layer: one attention layer, as the published checkpoints have
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},  # the same: all Mamba
    # attention every 8th layer from layer 4: none among the first two, and the same mask failure
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    # its heads x head_dim must equal expand x hidden_size (2 x 64): the generic 4 heads of 16 make 64
    "mamba2": {"num_heads": 8},
    # the class default routes to None experts per token among 64 routed experts (the published configs set
    # it), so the router's topk has no k
    "deepseek_v2": {"num_experts_per_tok": 2},
    # the class defaults leave the number of experts and of experts per token None: no MoE layer can be built
    "dots1": {"n_routed_experts": EXPERTS, "num_experts_per_tok": 2, "n_shared_experts": 1},
}


def _layer_count(config) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _distinct(values: list) -> list:
    return [v for i, v in enumerate(values) if v not in values[:i]]


def _cut_layers(values: list, count: int) -> list:
    """A per-layer list (layer types, MoE or dense) cut to ``count`` layers that keep one layer of each kind
    in the order they first appear: the first layers alone may all be of one kind (hybrid models put their
    full attention every sixth layer, say), and a model of one kind is not the architecture."""
    kinds = _distinct(values)
    return (kinds + [kinds[-1]] * count)[:count]


def _token_id(value: Any, spare: list[int]) -> Any:
    """Special token ids outside the tiny vocabulary move into its top (nn.Embedding's padding_idx and the
    models' own checks refuse ids past the vocabulary)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= VOCAB:
        return spare.pop()
    if isinstance(value, list):
        return [_token_id(v, spare) for v in value]
    return value


def tiny_overrides(config) -> dict[str, Any]:
    """The keyword arguments that turn ``config``'s class defaults into a tiny config: ATTRIBUTE_RULES for
    ints, LIST_RULES for per-stage lists, per-layer lists cut to the new layer count, special token ids
    inside the vocabulary, and the same for every sub-config (passed as a dict, as from a config file)."""
    out: dict[str, Any] = {}
    layers = _layer_count(config)
    per_layer = {name: value for name, value in vars(config).items()
                 if isinstance(value, list) and layers and len(value) == layers and layers > LAYERS}
    kinds = max([LAYERS, *(len(_distinct(v)) for v in per_layer.values())])
    spare = list(range(VOCAB - 64, VOCAB))
    for name, value in sorted(vars(config).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and name in ATTRIBUTE_RULES:
            out[name] = ATTRIBUTE_RULES[name](value)
        elif isinstance(value, (list, tuple)) and name in LIST_RULES and all(isinstance(v, int) for v in value):
            out[name] = [LIST_RULES[name](i, v) for i, v in enumerate(value)]
        elif name in per_layer:
            out[name] = _cut_layers(value, kinds)
        elif name.endswith("_token_id") or name.endswith("_token_ids"):
            moved = _token_id(value, spare)
            if moved != value:
                out[name] = moved
        elif hasattr(value, "to_dict") and hasattr(value, "model_type") and not isinstance(value, type):
            out[name] = tiny_overrides(value)
    heads = next((getattr(config, n) for n in HEAD_NAMES if isinstance(getattr(config, n, None), int)), None)
    for name in KV_HEAD_NAMES:
        if heads is not None and getattr(config, name, None) == heads:
            out[name] = HEADS  # multi-head attention stays multi-head
    if per_layer:  # every kind of layer of a hybrid model (attention, linear attention, MoE) stays
        out.update({name: kinds for name in LAYER_NAMES if name in out})
    return out


def tiny_config(model_type: str):
    """The config class's defaults, shrunk by tiny_overrides, then OVERRIDES; built through the
    constructor so that derived attributes (layer types, head dims) follow the new sizes."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    kwargs = {**tiny_overrides(default), **OVERRIDES.get(model_type, {})}
    return type(default)(**kwargs)


# -- batches ----------------------------------------------------------------------------------------------

def _vocab(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or VOCAB)


def _tokens(vocab: int, gen: torch.Generator) -> torch.Tensor:
    # ids from 4 on: below the special tokens moved into the top of the vocabulary, above the usual 0-3
    return torch.randint(4, min(vocab, VOCAB - 64), (BATCH, SEQ), generator=gen)


def make_batch(model, task: str) -> dict:
    """Token ids + labels for LMs (decoder ids too for seq2seq), pixel_values + labels for vision, keyed by
    the model's main_input_name."""
    gen = torch.Generator().manual_seed(0)
    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    if task == "image-classification":
        if main != "pixel_values":
            raise ValueError(f"no generic batch for main input {main!r}")
        channels = getattr(config, "num_channels", 3)
        size = getattr(config, "image_size", IMAGE_SIZE)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return {main: torch.randn(BATCH, channels, size, size, generator=gen),
                "labels": torch.randint(0, config.num_labels, (BATCH,), generator=gen)}
    if main != "input_ids":
        raise ValueError(f"no generic batch for main input {main!r}")
    ids = _tokens(_vocab(config), gen)
    if task == "seq2seq-lm":
        labels = _tokens(_vocab(config), gen)
        start = next((v for v in (getattr(config, "decoder_start_token_id", None),
                                  getattr(config, "pad_token_id", None)) if isinstance(v, int)), 0)
        decoder = torch.cat([torch.full((BATCH, 1), start), labels[:, :-1]], dim=1)
        return {"input_ids": ids, "decoder_input_ids": decoder, "labels": labels}
    return {"input_ids": ids, "labels": ids.clone()}


# -- Lightning's demo models ------------------------------------------------------------------------------

def _step_loss(module, batch) -> torch.Tensor:
    """A LightningModule's training_step loss, as Lightning's loop takes it."""
    out = module.training_step(batch, 0)
    return out["loss"] if isinstance(out, dict) else out


def _demo_transformer_loss(model, batch) -> torch.Tensor:
    inputs, target = batch
    return torch.nn.functional.nll_loss(model(inputs, target), target.view(-1))


def lightning_demos() -> dict[str, tuple[Callable, Callable, Callable]]:
    """name -> (build model, build batch, loss_fn), each as Lightning's demos train."""
    try:
        from lightning.pytorch import demos
    except ImportError:
        from pytorch_lightning import demos

    def ids() -> torch.Tensor:
        return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def vectors() -> torch.Tensor:
        return torch.randn(4, 32, generator=torch.Generator().manual_seed(0))

    return {
        "lightning:Transformer": (lambda: demos.Transformer(vocab_size=VOCAB), lambda: (ids(), ids()),
                                  _demo_transformer_loss),
        "lightning:LightningTransformer": (lambda: demos.LightningTransformer(vocab_size=VOCAB),
                                           lambda: (ids(), ids()), _step_loss),
        "lightning:LightningLSTM": (lambda: demos.LightningLSTM(vocab_size=VOCAB), lambda: (ids(), ids()),
                                    _step_loss),
        "lightning:BoringModel": (demos.BoringModel, vectors, _step_loss),
        "lightning:DemoModel": (demos.DemoModel, vectors, _step_loss),
    }


# -- one architecture -------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    model_type: str
    task: str
    class_name: str = ""
    params: int | None = None
    instantiable: bool = False
    not_instantiable: str = ""
    real_peak: int | None = None
    real_failed: str = ""
    traced: bool = False
    estimate: int | None = None
    bound: int | None = None
    """Estimate.bound_bytes: above ``estimate`` only where routing was assumed."""
    error: float | None = None
    estimate_seconds: float | None = None
    trace_error: str = ""
    trace_error_kind: str = ""
    trace_error_where: str = ""
    assumption: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Arch:
    name: str
    model_type: str
    task: str
    build: Callable[[], tuple[torch.nn.Module, Any, Callable | None]]


def _hf_build(model_type: str, task: str) -> Callable:
    def build():
        import transformers

        config = tiny_config(model_type)
        torch.manual_seed(0)
        model = getattr(transformers, TASKS[task][1]).from_config(config)
        model = model.float()
        return model, make_batch(model, task), None
    return build


def _demo_build(make_model: Callable, make_batch_: Callable, loss_fn: Callable) -> Callable:
    def build():
        torch.manual_seed(0)
        return make_model(), make_batch_(), loss_fn
    return build


def architectures() -> list[Arch]:
    """Every model type of the four mappings (in mapping order), then Lightning's demos."""
    from transformers.models.auto import modeling_auto

    out = []
    for task, (mapping, _) in TASKS.items():
        for model_type in getattr(modeling_auto, mapping):
            out.append(Arch(f"{model_type}/{task}", model_type, task, _hf_build(model_type, task)))
    for name, (make_model, make_batch_, loss_fn) in lightning_demos().items():
        out.append(Arch(name, name, "lightning-demo", _demo_build(make_model, make_batch_, loss_fn)))
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _memguard_frame(exc: BaseException) -> str:
    """The deepest frame of memguard's own code in the traceback (where a crash happened)."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if f"{os.sep}memguard{os.sep}" in frame.filename:
            where = f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    return where


def _error_kind(exc: BaseException, refusal: type) -> str:
    """refusal: memguard says it cannot trace (its own error type); crash: a Python exception raised in
    memguard's own code; exception: raised elsewhere (torch or the model's code) while memguard traced."""
    if isinstance(exc, refusal):
        return "refusal"
    frames = traceback.extract_tb(exc.__traceback__)
    return "crash" if frames and f"{os.sep}memguard{os.sep}" in frames[-1].filename else "exception"


def run_one(arch: Arch, send: Callable[[dict], None]) -> None:
    """Build, measure, estimate; each stage's result is sent as soon as it is known, so that a time limit
    hit later still leaves what was learned."""
    import memguard
    from memguard.errors import MemguardError

    row = Row(arch.name, arch.model_type, arch.task)
    try:
        model, batch, loss_fn = arch.build()
        row.class_name = type(model).__name__
        row.params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        row.instantiable = True
    except Exception as exc:  # anything: missing packages, remote code, config checks
        row.not_instantiable = _first_line(exc)
        send(asdict(row))
        return
    send(asdict(row))
    try:
        row.real_peak = measure_peak(model, batch, REAL_OPTIMIZERS["adamw"], loss_fn=loss_fn)
    except Exception as exc:
        row.real_failed = _first_line(exc)
        send(asdict(row))
        return
    send(asdict(row))
    started = time.perf_counter()
    try:
        est = memguard.estimate(copy.deepcopy(model), batch, loss_fn=loss_fn, optimizer="adamw",
                                precision="32-true", device="cpu")
    except Exception as exc:
        row.estimate_seconds = time.perf_counter() - started
        row.trace_error = _first_line(exc)
        row.trace_error_kind = _error_kind(exc, MemguardError)
        row.trace_error_where = _memguard_frame(exc)
        send(asdict(row))
        return
    row.estimate_seconds = time.perf_counter() - started
    row.traced = True
    row.estimate = est.peak_bytes
    row.bound = est.bound_bytes
    row.error = (est.peak_bytes - row.real_peak) / row.real_peak
    row.notes = list(est.notes)
    row.assumption = "; ".join(n for n in est.notes if "assum" in n.lower())
    send(asdict(row))


def _child(arch: Arch, conn) -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    try:
        run_one(arch, conn.send)
    finally:
        conn.send(None)
        conn.close()


def run_isolated(arch: Arch, timeout: float) -> dict:
    """run_one in a forked child (the parent's imports are shared, nothing else is), killed after
    ``timeout`` seconds; the last stage it reported is the row."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(arch, child), daemon=True)
    started = time.perf_counter()
    proc.start()
    child.close()
    row = asdict(Row(arch.name, arch.model_type, arch.task))
    finished = False
    while (left := timeout - (time.perf_counter() - started)) > 0 and parent.poll(left):
        try:
            msg = parent.recv()
        except EOFError:  # the child died without saying goodbye (a crash in native code)
            break
        if msg is None:
            finished = True
            break
        row = msg
    if not finished:
        proc.kill()
        proc.join(5)
        reason = (f"no result: killed after the {timeout:.0f} s limit" if time.perf_counter() - started >= timeout
                  else f"no result: the process died (exit code {proc.exitcode})")
        stage = _stage_reached(row)
        row[{"build": "not_instantiable", "real": "real_failed", "estimate": "trace_error"}[stage]] = reason
        if stage == "estimate":
            row["trace_error_kind"] = "timeout"
    proc.join(5)
    row["seconds"] = time.perf_counter() - started
    return row


def _stage_reached(row: dict) -> str:
    if not row["instantiable"]:
        return "build"
    return "real" if row["real_peak"] is None else "estimate"


# -- results ----------------------------------------------------------------------------------------------

def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.2f} MiB"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:+.2%}"


def _group_key(message: str) -> str:
    """Errors that differ only in numbers, shapes or quoted names are one cause."""
    key = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    return re.sub(r"\d+", "N", key)[:160]


def summarize(rows: list[dict]) -> dict:
    usable = [r for r in rows if r["instantiable"] and r["real_peak"] is not None]
    traced = [r for r in usable if r["traced"]]
    errors = [abs(r["error"]) for r in traced]
    return {
        "architectures": len(rows),
        "instantiable": len(usable),
        "traced": len(traced),
        "traced_share": len(traced) / len(usable) if usable else 0.0,
        "within_2pct": sum(e <= WITHIN for e in errors),
        "median_abs_error": statistics.median(errors) if errors else None,
        "max_abs_error": max(errors) if errors else None,
        "crashes": sum(r["trace_error_kind"] == "crash" for r in usable),
        "bound_below_real": sorted(((r.get("bound") or r["estimate"]) - r["real_peak"], r["name"], r["real_peak"])
                                   for r in traced if (r.get("bound") or r["estimate"]) < r["real_peak"]),
    }


def _grouped(rows: list[dict], field_name: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_group_key(r[field_name]), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))


def _below(rows: list) -> str:
    """How many bounds fall below the real peak, and by how much at most (bytes, and the largest share)."""
    if not rows:
        return "none"
    worst_bytes = min(rows)
    worst_share = min(rows, key=lambda r: r[0] / r[2])
    return (f"{len(rows)}, by at most {-worst_bytes[0]:,} bytes ({worst_bytes[1]}); the largest share "
            f"{worst_share[0] / worst_share[2]:+.2%} ({worst_share[1]}, {-worst_share[0]:,} bytes of {worst_share[2]:,})")


def _bound(r: dict) -> str:
    """The routing bound where it differs from the estimate, with its error."""
    bound = r.get("bound")
    if bound is None or r["estimate"] is None or bound == r["estimate"]:
        return ""
    return f"{_mib(bound)} ({_pct((bound - r['real_peak']) / r['real_peak'])})"


def render(rows: list[dict], total_seconds: float, timeout: float) -> tuple[list[list[str]], list[str]]:
    s = summarize(rows)
    usable = [r for r in rows if r["instantiable"] and r["real_peak"] is not None]
    table = [[r["name"], r["class_name"], f"{r['params']:,}", _mib(r["real_peak"]),
              "yes" if r["traced"] else "**no**", _mib(r["estimate"]), _pct(r["error"]), _bound(r),
              "" if r["estimate_seconds"] is None else f"{r['estimate_seconds']:.1f}",
              (r["trace_error"] or r["assumption"]).replace("|", "\\|")[:160]] for r in usable]
    med = "n/a" if s["median_abs_error"] is None else f"{s['median_abs_error']:.2%}"
    mx = "n/a" if s["max_abs_error"] is None else f"{s['max_abs_error']:.2%}"
    summary = [
        "", "## Summary", "",
        f"- architectures swept: {s['architectures']} (transformers model types x task, Lightning demos)",
        f"- instantiable and trainable from a tiny config: **{s['instantiable']}**",
        f"- traced by memguard: **{s['traced']} / {s['instantiable']} ({s['traced_share']:.1%})**",
        f"- traced within {WITHIN:.0%} of the real peak: **{s['within_2pct']} / {s['traced']}**",
        f"- abs error over traced: median **{med}**, max **{mx}**",
        f"- Python exceptions raised in memguard's own code (crashes, not refusals): {s['crashes']}",
        "- traced with the bound (Estimate.bound_bytes, what \"fits\" is decided on) below the real peak: "
        + _below(s["bound_below_real"]),
    ]
    traced = sorted((r for r in usable if r["traced"]), key=lambda r: r["error"])
    if traced:
        over = [f"{r['name']} {_pct(r['error'])}" for r in traced[::-1][:5] if r["error"] > 0]
        under = [f"{r['name']} {_pct(r['error'])}" for r in traced[:5] if r["error"] < 0]
        summary.append("- largest over-predictions: " + (", ".join(over) or "none"))
        summary.append("- largest under-predictions: " + (", ".join(under) or "none"))
    notes = summary + ["", "## Not traced, by error", ""]
    for key, group in _grouped([r for r in usable if not r["traced"]], "trace_error").items():
        kind = group[0]["trace_error_kind"]
        where = sorted({r["trace_error_where"] for r in group if r["trace_error_where"]})
        notes.append(f"- {len(group)} x ({kind}{', at ' + ', '.join(where) if where else ''}) `{key}`: "
                     + ", ".join(r["name"] for r in group))
    if all(r["traced"] for r in usable):
        notes.append("None: every instantiable architecture traced.")
    failed_build = sum(not r["instantiable"] for r in rows)
    notes += ["", "## Excluded: not instantiable from a tiny config, or the real steps failed", "",
              f"{failed_build} not instantiable, {len(rows) - len(usable) - failed_build} instantiable whose real "
              "steps failed on the generic batch; neither counts in the denominator.", ""]
    excluded = [dict(r, reason=("not instantiable: " + r["not_instantiable"]) if not r["instantiable"]
                     else "real steps failed: " + r["real_failed"]) for r in rows if r not in usable]
    for key, group in _grouped(excluded, "reason").items():
        notes.append(f"- {len(group)} x `{key}`: " + ", ".join(r["name"] for r in group))
    notes += [
        "", "## Method", "",
        f"Batch {BATCH} x {SEQ} tokens (labels = inputs; seq2seq: separate labels, decoder inputs the labels "
        f"shifted right after the decoder start token), images {IMAGE_SIZE}x{IMAGE_SIZE} with patch {PATCH_SIZE}. Tiny configs: the "
        "config class's defaults with the size-like attributes of ATTRIBUTE_RULES / LIST_RULES shrunk (hidden "
        f"{HIDDEN}, FFN {FFN}, {LAYERS} layers, {HEADS} heads, {KV_HEADS} kv heads unless multi-head or "
        f"multi-query, vocab {VOCAB}, positions {POSITIONS}, <= {EXPERTS} experts), the model's default "
        "attention implementation, float32.",
        "Real peak: tests/groundtruth.py's measure_peak, two AdamW steps (forward, backward, step, zero_grad). "
        "Error = (estimate - real) / real. Estimate seconds: one memguard.estimate(device=\"cpu\") call in "
        "a forked child, on a machine shared with other work.",
        f"Each architecture runs in its own forked process, killed after {timeout:.0f} s. Whole run: "
        f"{total_seconds / 60:.0f} min.",
        "Rerun: python benchmarks/coverage.py (--only gpt2,bert for a quick look).",
    ]
    return table, notes


def write_results(rows: list[dict], output: str, total_seconds: float, timeout: float,
                  results: Path = RESULTS) -> str:
    """coverage.md in write_table's layout, with the summary above the table (the table is long), and
    coverage.json with the raw rows."""
    table, notes = render(rows, total_seconds, timeout)
    summary_end = notes.index("## Not traced, by error") - 1
    headers = ["architecture", "class", "parameters", "real peak", "traced", "estimate", "error", "bound", "estimate s",
               "not traced because / assumption"]
    lines = ["# Coverage: which architectures memguard traces, and how exactly (CPU ground truth)", "",
             f"Machine: {machine()}", *notes[:summary_end], "", "## All instantiable architectures", "",
             "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
             *["| " + " | ".join(str(c) for c in row) + " |" for row in table], *notes[summary_end:]]
    text = "\n".join(lines) + "\n"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{output}.md").write_text(text)
    (results / f"{output}.json").write_text(json.dumps(
        {"summary": summarize(rows), "seconds": total_seconds, "timeout": timeout, "rows": rows}, indent=1) + "\n")
    return text


def select(archs: list[Arch], only: str | None, limit: int | None) -> list[Arch]:
    if only:
        names = {n.strip() for n in only.split(",") if n.strip()}
        archs = [a for a in archs if a.name in names or a.model_type in names]
    return archs[:limit] if limit else archs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types, row ids or lightning:Name")
    parser.add_argument("--limit", type=int, help="only the first N architectures")
    parser.add_argument("--jobs", type=int, default=1, help="architectures at a time (only 1 is supported)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per architecture")
    parser.add_argument("--output", default="coverage", help="file stem under benchmarks/results")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where to write (default: %(default)s)")
    parser.add_argument("--update", action="store_true",
                        help="with --only: rerun these architectures and replace their rows in the existing .json")
    parser.add_argument("--from-json", action="store_true",
                        help="rewrite the .md from the rows of the existing .json, running nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads((args.results_dir / f"{args.output}.json").read_text())
        print(write_results(saved["rows"], args.output, saved["seconds"], saved["timeout"], args.results_dir))
        return
    if args.jobs != 1:
        parser.error("--jobs: only 1 is supported (the machine is shared; timings need a quiet core)")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import memguard  # noqa: F401  (imported once here: the forked children share it)
    import transformers  # noqa: F401

    archs = select(architectures(), args.only, args.limit)
    started = time.perf_counter()
    rows = []
    for i, arch in enumerate(archs, 1):
        row = run_isolated(arch, args.timeout)
        rows.append(row)
        state = ("not instantiable: " + row["not_instantiable"] if not row["instantiable"] else
                 "real failed: " + row["real_failed"] if row["real_peak"] is None else
                 f"error {row['error']:+.2%}" if row["traced"] else "not traced: " + row["trace_error"])
        print(f"[{i}/{len(archs)}] {arch.name} ({row['seconds']:.0f}s): {state[:200]}", flush=True)
    seconds = time.perf_counter() - started
    if args.update:
        saved = json.loads((args.results_dir / f"{args.output}.json").read_text())
        fresh = {r["name"]: r for r in rows}
        rows = [fresh.pop(r["name"], r) for r in saved["rows"]] + list(fresh.values())
        seconds += saved["seconds"]
    print(write_results(rows, args.output, seconds, args.timeout, args.results_dir))


if __name__ == "__main__":
    main()
