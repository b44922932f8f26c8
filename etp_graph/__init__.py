"""etp_graph: dependency-aware structured pruning with Exponential Torque regularisation."""
from . import handlers, zoo
from .counting import compare_latency, count_macs, count_params, measure_latency, unsupported_ops
from .graph import ChannelGraph, CoupledGroup, SkippedGroup, TraceError, trace
from .importance import ETPImportance, ETPRegularizedPruner
from .io import load_pruned, save_pruned
from .pruner import ETPPruner, GroupResult, PrunePlan, PruneReport
from .torque import ETP, ETPConfig, GroupSL, Regularizer, Torque, make_regularizer

__all__ = [
    "trace", "ChannelGraph", "CoupledGroup", "SkippedGroup", "TraceError",
    "ETPConfig", "Regularizer", "ETP", "Torque", "GroupSL", "make_regularizer",
    "ETPPruner", "PrunePlan", "PruneReport", "GroupResult",
    "ETPImportance", "ETPRegularizedPruner",
    "compare_latency", "count_macs", "count_params", "measure_latency", "unsupported_ops",
    "save_pruned", "load_pruned",
    "handlers", "zoo",
]
__version__ = "0.1.0"
