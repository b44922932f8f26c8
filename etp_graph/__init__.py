"""etp_graph: dependency-aware structured pruning with Exponential Torque regularisation."""
from . import handlers, zoo
from .counting import count_macs, count_params, measure_latency, unsupported_ops
from .graph import ChannelGraph, CoupledGroup, SkippedGroup, TraceError, trace

__all__ = [
    "trace", "ChannelGraph", "CoupledGroup", "SkippedGroup", "TraceError",
    "count_macs", "count_params", "measure_latency", "unsupported_ops",
    "handlers", "zoo",
]
__version__ = "0.1.0"
