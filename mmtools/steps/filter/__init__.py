"""`filter`: SQL conditions, presets, audio rules and the global top fraction."""

from mmtools.steps.filter.near import NearConfig, NearFilter
from mmtools.steps.filter.rank import TopFraction, TopFractionConfig
from mmtools.steps.filter.step import Filter, FilterConfig, RankedFilter, make_filter

__all__ = [
    "Filter",
    "FilterConfig",
    "NearConfig",
    "NearFilter",
    "RankedFilter",
    "TopFraction",
    "TopFractionConfig",
    "make_filter",
]
