"""Diagnostic callbacks that drop into any Lightning project.

Each subclasses ``lightning.pytorch.Callback``, finds its layers itself (forward hooks on module
types, chosen with ``include``/``exclude`` globs on module names) and logs through the trainer's
loggers under its own prefix: ``saturation/``, ``condition/``, ``alpha/``, ``max_norm/``,
``grad_flow/``.
"""
from .alpha import AlphaScheduler
from .condition import ConditionNumberProbe, condition_number, infinity_norm_condition
from .grad_flow import GradientFlowMonitor
from .max_norm import MaxNormConstraint, apply_max_norm
from .saturation import ActivationSaturationMonitor

DIAGNOSTICS = {
    "saturation": ActivationSaturationMonitor,
    "condition": ConditionNumberProbe,
    "grad_flow": GradientFlowMonitor,
}

__all__ = ["ActivationSaturationMonitor", "ConditionNumberProbe", "MaxNormConstraint", "AlphaScheduler",
           "GradientFlowMonitor", "condition_number", "infinity_norm_condition", "apply_max_norm", "DIAGNOSTICS"]
