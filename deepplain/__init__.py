"""deepplain: train very deep networks without skip connections, and see layer by layer why they fail."""
from .errors import ConfigError, DatasetError, DeepplainError, DivergenceError, RunFailure
from .fold import fold
from .layers import count_parameters
from .registry import build_model, get_family, model_names

__version__ = "0.1.0"
__all__ = ["build_model", "fold", "model_names", "get_family", "count_parameters", "ConfigError", "DatasetError",
           "DeepplainError", "DivergenceError", "RunFailure", "__version__"]
