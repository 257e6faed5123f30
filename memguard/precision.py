"""Lightning's precision strings as one enum, and what each means for memory.

The strings are Lightning's own so that a Trainer's ``precision`` and a config's ``trainer.precision`` can
be passed through unchanged. Aliases Lightning accepts ("bf16", "16", 32, "32") map to the same members.
"""

from __future__ import annotations

from enum import Enum

import torch

from memguard.errors import InvalidArgumentError, closest, unknown_name


class Precision(str, Enum):
    FP32_TRUE = "32-true"
    FP16_MIXED = "16-mixed"
    BF16_MIXED = "bf16-mixed"
    FP16_TRUE = "16-true"
    BF16_TRUE = "bf16-true"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:  # messages quote it as the string a user writes: 'bf16-mixed'
        return repr(self.value)

    @classmethod
    def parse(cls, value: object) -> Precision:
        """Accept a member, a Lightning precision string, or one of Lightning's legacy aliases."""
        if isinstance(value, Precision):
            return value
        text = str(value).strip().lower()
        text = _ALIASES.get(text, text)
        for member in cls:
            if member.value == text:
                return member
        raise unknown_name("precision", str(value), [m.value for m in cls])

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype autocast computes in, or None when the forward pass runs without autocast."""
        return {Precision.FP16_MIXED: torch.float16, Precision.BF16_MIXED: torch.bfloat16}.get(self)

    @property
    def param_dtype(self) -> torch.dtype | None:
        """The dtype weights are converted to before training, or None when they keep their own."""
        return {Precision.FP16_TRUE: torch.float16, Precision.BF16_TRUE: torch.bfloat16}.get(self)

    @property
    def needs_bf16(self) -> bool:
        return self in (Precision.BF16_MIXED, Precision.BF16_TRUE)


_ALIASES = {
    "32": "32-true",
    "32-bit": "32-true",
    "fp32": "32-true",
    "16": "16-mixed",
    "fp16": "16-mixed",
    "16-bit": "16-mixed",
    "bf16": "bf16-mixed",
    "fp16-mixed": "16-mixed",
    "fp16-true": "16-true",
}


LIGHTNING_2_PRECISIONS = ("16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true", "64", "32", "16",
                          "bf16", "transformer-engine", "transformer-engine-float16")
"""``Trainer(precision=...)`` values of Lightning 2.x (``lightning_fabric.connector._PRECISION_INPUT``), for
when Lightning is not installed."""


def lightning_precisions() -> tuple[str, ...]:
    """The precision values the installed Lightning's Trainer accepts (integers as their strings)."""
    import typing

    try:
        from lightning_fabric import connector
    except ImportError:
        return LIGHTNING_2_PRECISIONS
    values = []
    for name in ("_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS", "_PRECISION_INPUT_INT"):
        values += [str(v) for v in typing.get_args(getattr(connector, name, None))]
    return tuple(dict.fromkeys(values)) or LIGHTNING_2_PRECISIONS


def parse_lightning(value: object) -> Precision:
    """A ``Trainer(precision=...)`` value: exactly what Lightning accepts (so a config that passes here
    starts in Lightning), as the precision memguard predicts. A spelling memguard knows but Lightning
    refuses ("fp16") is answered with Lightning's name for it."""
    text = str(value).strip().lower() if not isinstance(value, bool) else repr(value)
    accepted = lightning_precisions()
    if text not in accepted:
        try:
            meant = [Precision.parse(text).value]
        except InvalidArgumentError:
            meant = closest(text, accepted)
        hint = f" Did you mean {', '.join(repr(m) for m in meant)}?" if meant else ""
        raise InvalidArgumentError(f"Lightning's Trainer does not accept precision {str(value)!r}.{hint} "
                                   f"Valid: {', '.join(accepted)}.")
    if text.startswith("transformer-engine") or text.startswith("64"):
        raise InvalidArgumentError(f"precision {text!r} is accepted by Lightning but memguard does not predict it; "
                                   f"it predicts {', '.join(m.value for m in Precision)}")
    return Precision.parse(text)
