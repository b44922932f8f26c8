"""Tracing a model into coupled groups."""
from .group import ChannelGraph, CoupledGroup, SkippedGroup
from .trace import HARMLESS_OPS, TraceError, trace

__all__ = ["ChannelGraph", "CoupledGroup", "SkippedGroup", "TraceError", "trace", "HARMLESS_OPS"]
