"""Tracing a model into coupled groups."""
from .graph import ChannelGraph, SkippedGroup
from .group import CoupledGroup
from .ops import HARMLESS_OPS
from .trace import TraceError, trace

__all__ = ["ChannelGraph", "CoupledGroup", "SkippedGroup", "TraceError", "trace", "HARMLESS_OPS"]
