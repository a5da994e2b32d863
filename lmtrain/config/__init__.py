"""Config schemas and checks; `from lmtrain.config import ...` reaches both."""

from lmtrain.config.checks import CHOICES, ConfigError, accumulation_steps, all_keys, nearest, validate
from lmtrain.config.schema import (
    DataConfig,
    EvalDataConfig,
    EvaluateConfig,
    ExampleDataConfig,
    FinetuneConfig,
    GenerateConfig,
    GradAccumConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    PredictConfig,
    PretrainConfig,
    SchedulerConfig,
    TaskConfig,
    TrainerConfig,
)

__all__ = [
    "CHOICES",
    "ConfigError",
    "DataConfig",
    "EvalDataConfig",
    "EvaluateConfig",
    "ExampleDataConfig",
    "FinetuneConfig",
    "GenerateConfig",
    "GradAccumConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PredictConfig",
    "PretrainConfig",
    "SchedulerConfig",
    "TaskConfig",
    "TrainerConfig",
    "accumulation_steps",
    "all_keys",
    "nearest",
    "validate",
]
