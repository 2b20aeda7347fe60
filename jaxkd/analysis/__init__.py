"""Representation analysis tools."""

from jaxkd.analysis.cka import linear_cka

__all__ = ["linear_cka"]
