"""Each command's schema, registered in Hydra's ConfigStore as `<command>_schema`: the first entry of the
command's defaults list, so every default comes from `lmtrain.config.schema` and an option YAML under
configs/ holds only what it changes."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lmtrain.config.schema import (
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    GenerateConfig,
    InspectConfig,
    PredictConfig,
    PretrainConfig,
)

SCHEMAS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "generate": GenerateConfig,
    "predict": PredictConfig,
    "export": ExportConfig,
    "inspect": InspectConfig,
}

# the key of each group that holds its option's name: filled from the option chosen (`optimizer=sgd`), never
# written in the option's YAML nor set on the command line
IDENTITY = {"optimizer": "name", "scheduler": "name", "loss": "name", "task": "name", "adapter": "name"}
IDENTITY["grad_accum"] = "mode"


def register() -> None:
    """Store each schema as plain values: `lmtrain.config.checks.validate` type-checks the composed config
    afterwards, so a mistake is reported with the key to fix rather than as Hydra's composition error."""
    store = ConfigStore.instance()
    for command, schema in SCHEMAS.items():
        node = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
        assert isinstance(node, dict)
        for group, key in IDENTITY.items():  # Hydra's own view (--cfg job, .hydra/) names the option chosen
            if group in node:
                node[group][key] = "${hydra:runtime.choices." + group + "}"
        store.store(name=f"{command}_schema", node=node)
