"""The spec's search space (`tune.search_space`) as Optuna distributions: the one
translation, used by the searcher that samples trials and by the study the report records."""

from __future__ import annotations

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from lmforge.config import Choice, IntRange, LogUniform, SearchDim, Uniform


def distribution(dim: SearchDim) -> BaseDistribution:
    """One search-space entry as the Optuna distribution the sampler draws from (and the
    report's study records)."""
    match dim:
        case LogUniform(low=lo, high=hi):
            return FloatDistribution(lo, hi, log=True)
        case Uniform(low=lo, high=hi):
            return FloatDistribution(lo, hi)
        case IntRange(low=lo, high=hi):
            return IntDistribution(lo, hi)  # both bounds inclusive, as the spec says
        case Choice(values=values):
            return CategoricalDistribution(values)
    raise TypeError(dim)


def distributions(space: dict[str, SearchDim]) -> dict[str, BaseDistribution]:
    return {key: distribution(dim) for key, dim in space.items()}
