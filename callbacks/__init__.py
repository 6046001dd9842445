"""Diagnostic callbacks that drop into any Lightning project (installed as ``deepplain.callbacks``).

Each subclasses ``lightning.pytorch.Callback``, depends on nothing of deepplain's models, finds
its layers itself (forward hooks on module types, chosen with ``include``/``exclude`` globs on
module names) and logs through the trainer's loggers under its own prefix: ``saturation/``,
``condition/``, ``grad_flow/``, ``max_norm/``, ``alpha/``; ``TrainabilityVerdict`` reads what the
sampling ones measured and gives an early verdict (``overview/verdict``). The sampling ones share
``deepplain.callbacks.sampling`` (cadence, time budget, probe batch, state); the building
blocks for looking inside a model are public in ``deepplain.callbacks.probing``.
"""
from .alpha import AlphaScheduler
from .arguments import check_int, check_number
from .condition import ConditionNumberProbe
from .grad_flow import GradientFlowMonitor
from .linalg import condition_number, infinity_norm_condition, weight_conditions
from .max_norm import MaxNormConstraint, apply_max_norm
from .messages import DiagnosticWarning, install_format
from .sampling import SamplingCallback
from .saturation import ActivationSaturationMonitor
from .verdict import TrainabilityVerdict

install_format()  # the diagnostics' warnings print as one line, in any project (see messages.py)

DIAGNOSTICS = {
    "saturation": ActivationSaturationMonitor,
    "condition": ConditionNumberProbe,
    "grad_flow": GradientFlowMonitor,
    "verdict": TrainabilityVerdict,  # reads the others: after them
}

__all__ = ["ActivationSaturationMonitor", "ConditionNumberProbe", "MaxNormConstraint", "AlphaScheduler",
           "GradientFlowMonitor", "TrainabilityVerdict", "SamplingCallback", "condition_number",
           "infinity_norm_condition", "weight_conditions", "apply_max_norm", "DiagnosticWarning", "DIAGNOSTICS",
           "check_int", "check_number"]
