"""Options an algorithm declares for itself, next to its code (as PEFT's config dataclasses or
pfl-research's `FedProxParams`): a pydantic model per algorithm, given in the experiment file
under the algorithm's name,

    algorithm: {name: fedprox, mu: 0.1}        # or: --set algorithm.mu=0.1

validated like every other field (an unknown key or a value out of range is an error naming
`algorithm.<option>`), saved in the run's config.yaml, listed by `fltac-ray tasks` and compared on
resume. A plug-in from outside the package declares its options the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AlgorithmOptions(BaseModel):
    """Base of every algorithm's options. An algorithm without options keeps this empty model.

        class FedProxOptions(AlgorithmOptions):
            mu: float = Field(0.01, ge=0, description="weight of the proximal term")
    """

    # A typo is an error naming the key; .inf/.nan are refused, as in the experiment schema.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, frozen=True)

    def saved(self) -> dict[str, Any]:
        """The options as the run's config.yaml records them: a dict that validates back to
        these options (an option that is refused unless used is left out when unused)."""
        return self.model_dump(mode="json")


def describe_options(options: type[AlgorithmOptions]) -> list[str]:
    """One line per option: `name = default: description`, for `fltac-ray tasks`."""
    lines = []
    for name, field in options.model_fields.items():
        default: Any = field.get_default(call_default_factory=True)
        lines.append(f"{name} = {default!r}: {field.description or ''}".rstrip(": "))
    return lines


# --- options several algorithms share, declared once ---------------------------------------

#: How a group's members are weighted in its average; every averaging algorithm has it.
Weighting = Annotated[Literal["samples", "uniform"], Field(
    default="samples", description="members weighted by their sample counts (the FL-TAC authors' "
    "code) or uniformly (the FL-TAC paper)")]

#: K: how many groups the server forms (FL-TAC's K-means, IFCA's server models).
ClusterCount = Annotated[int | None, Field(
    default=None, ge=1, description="K, the groups the server forms; default: the number of tasks")]


class AggregationOptions(AlgorithmOptions):
    """How a group of uploads becomes one adapter: the options of every algorithm that averages
    (FL-TAC, IFCA, oracle, FedIT and the FedAvg family, FedSA, FFA)."""

    weighting: Weighting
    aggregation: Literal["mean", "median", "trimmed_mean"] = Field(
        default="mean", description="inside each group: weighted mean (FedAvg), coordinate-wise "
        "median or trimmed mean (robust to malicious or broken clients; algorithms/robust.py)")
    trim_fraction: float = Field(
        default=0.1, ge=0, lt=0.5,
        description="trimmed_mean: share of members dropped at each end per coordinate (< 0.5)")

    @model_validator(mode="after")
    def _trim_only_when_trimming(self) -> AggregationOptions:
        if "trim_fraction" in self.model_fields_set and self.aggregation != "trimmed_mean":
            raise ValueError(f"trim_fraction = {self.trim_fraction}: only used with aggregation: "
                             f"trimmed_mean (here {self.aggregation!r})")
        return self

    def saved(self) -> dict[str, Any]:
        out = super().saved()
        if self.aggregation != "trimmed_mean":
            out.pop("trim_fraction")  # unused, and refused when given: the file must load back
        return out
