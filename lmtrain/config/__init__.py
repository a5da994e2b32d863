"""Config schemas and checks; `from lmtrain.config import ...` reaches both."""

from lmtrain.config.checks import ConfigError, accumulation_steps, validate
from lmtrain.config.keys import CHOICES, all_keys, nearest, string_keys
from lmtrain.config.schema import (
    DataConfig,
    EvalDataConfig,
    EvaluateConfig,
    ExampleDataConfig,
    ExportConfig,
    FinetuneConfig,
    GenerateConfig,
    GradAccumConfig,
    InspectConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    PredictConfig,
    PretrainConfig,
    SchedulerConfig,
    TaskConfig,
    TrainerConfig,
)
from lmtrain.config.store import SCHEMAS, register

register()

__all__ = [
    "CHOICES",
    "ConfigError",
    "DataConfig",
    "EvalDataConfig",
    "EvaluateConfig",
    "ExampleDataConfig",
    "ExportConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "GradAccumConfig",
    "InspectConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PredictConfig",
    "PretrainConfig",
    "SCHEMAS",
    "SchedulerConfig",
    "TaskConfig",
    "TrainerConfig",
    "accumulation_steps",
    "all_keys",
    "nearest",
    "string_keys",
    "validate",
]
