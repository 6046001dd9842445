"""A run's identity as the trackers see it: the options that tell the runs of a sweep apart, and
TensorBoard's HParams table of them with the final metrics.

TensorBoard (2.21) orders the table's columns itself: options marked as differing between runs
first, each group by name, and it ticks the first five columns of the table. deepplain writes the
table's definition (the HParams "experiment") with every identifying option of any family, so a
sweep's VAN and plain runs share one set of columns, and marks :data:`SHOWN` as the differing ones:
they come first and the first five of them, by name, are ticked (``activation``, ``dataset``,
``depth``, ``lr``, ``model``; ``norm`` and ``width`` next, one click away). Torch's own table would
list every option by name (``accumulate_grad_batches`` first) with only the first five ticked.
"""
from __future__ import annotations

from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard.summary import hparams as torch_hparams

from .config import model_options
from .registry import get_family
from .schema import OPTIONS, RunConfig
from .status import METRIC_TAGS, RunSummary

# These, from any group, and every other option of the schema's groups that define what is trained (a
# run's label smoothing or gate bias shows there too); the plumbing (paths, workers, progress) is in config.json.
FIRST = ("model", "arch", "depth", "width", "dataset", "activation", "norm", "init", "max_norm", "alpha_mode",
         "optimizer", "lr", "momentum", "weight_decay", "schedule", "batch_size", "epochs", "seed", "precision",
         "val_split")
GROUPS = ("model", "van", "optimisation")
KEYS = FIRST + tuple(name for name, o in OPTIONS.items() if o.group in GROUPS and name not in FIRST)
SHOWN = ("model", "depth", "width", "norm", "activation", "dataset", "lr")  # first in the table (see above)
METRICS = tuple(METRIC_TAGS)


def run_identity(config: RunConfig) -> dict:
    """The options that identify a run (:data:`KEYS` that apply to its family), as loggers take them; a model
    option the run left unset has the value it trains with (the dataset's, else the family builder's default)."""
    trained = {**get_family(config.model).form(config.arch).defaults(), **model_options(config)}
    values = {k: getattr(config, k) if getattr(config, k) is not None else trained.get(k) for k in KEYS
              if config.applies(k)}
    values = {k: v for k, v in values.items() if v is not None}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in values.items()}


def final_metrics(summary: RunSummary) -> dict:
    """``hparam/<metric>`` for each final metric the run has."""
    return {f"hparam/{k}": float(getattr(summary, k)) for k in METRICS if getattr(summary, k) is not None}


def _data_type(value) -> int:
    if isinstance(value, bool):
        return api_pb2.DATA_TYPE_BOOL
    if isinstance(value, (int, float)):
        return api_pb2.DATA_TYPE_FLOAT64
    return api_pb2.DATA_TYPE_STRING


def experiment(params: dict, metrics: dict) -> api_pb2.Experiment:
    """The table's definition: every key of :data:`KEYS` (this run's value type where it has one), :data:`SHOWN`
    marked as differing, and the final metrics."""
    infos = [api_pb2.HParamInfo(name=k, differs=k in SHOWN,
                                **({"type": _data_type(params[k])} if k in params else {})) for k in KEYS]
    return api_pb2.Experiment(hparam_infos=infos,
                              metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metrics])


def summaries(params: dict, metrics: dict) -> list[Summary]:
    """The three summaries TensorBoard's HParams dashboard reads: the table's definition, this run's values
    (session start) and its end."""
    _, start, end = torch_hparams(params, metrics)
    content = plugin_data_pb2.HParamsPluginData(experiment=experiment(params, metrics),
                                                version=metadata.PLUGIN_DATA_VERSION)
    definition = Summary(value=[Summary.Value(tag=metadata.EXPERIMENT_TAG, metadata=SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())))])
    return [definition, start, end]


def write(logger, config: RunConfig, summary: RunSummary) -> bool:
    """The run's row of the HParams table into its TensorBoard logger (``hparams.yaml`` too); False when the run
    has no final metric yet."""
    params, metrics = run_identity(config), final_metrics(summary)
    if not metrics:
        return False
    logger.log_hyperparams(params)  # hparams.yaml; no event is written without metrics
    logger.log_metrics(metrics, step=0)
    writer = logger.experiment._get_file_writer()
    for item in summaries(params, metrics):
        writer.add_summary(item)
    return True
