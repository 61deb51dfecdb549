"""Options an algorithm declares for itself, next to its code (as PEFT's config dataclasses or
pfl-research's `FedProxParams`): a pydantic model per algorithm, given in the experiment file
under the algorithm's name,

    algorithm: {name: fedprox, mu: 0.1}        # or: --set algorithm.mu=0.1

validated like every other field (an unknown key or a value out of range is an error naming
`algorithm.<option>`), saved in the run's config.yaml, listed by `fltac-ray tasks` and compared on
resume. A plug-in from outside the package declares its options the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class AlgorithmOptions(BaseModel):
    """Base of every algorithm's options. An algorithm without options keeps this empty model.

        class FedProxOptions(AlgorithmOptions):
            mu: float = Field(0.01, ge=0, description="weight of the proximal term")
    """

    # A typo is an error naming the key; .inf/.nan are refused, as in the experiment schema.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, frozen=True)


def describe_options(options: type[AlgorithmOptions]) -> list[str]:
    """One line per option: `name = default: description`, for `fltac-ray tasks`."""
    lines = []
    for name, field in options.model_fields.items():
        default: Any = field.get_default(call_default_factory=True)
        lines.append(f"{name} = {default!r}: {field.description or ''}".rstrip(": "))
    return lines
