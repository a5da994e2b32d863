"""The tasks by name: `task=<name>` on the command line and the name in a checkpoint's task.json. A new task
is one module with a `Task` subclass, added here or, from outside lmtrain, with `register`."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from tokenizers import Tokenizer

from lmtrain.config import TaskConfig
from lmtrain.core.errors import UserError
from lmtrain.data.tokenizer import SpecialTokens
from lmtrain.tasks.base import Task, TaskInfo
from lmtrain.tasks.chat import Chat
from lmtrain.tasks.classification import Classification
from lmtrain.tasks.lm import LanguageModelling
from lmtrain.tasks.preference import Preference
from lmtrain.tasks.qa import QuestionAnswering
from lmtrain.tasks.rl import RL
from lmtrain.tasks.seq2seq import Seq2Seq

# task name (lmtrain.config.choices.TaskName, or a registered name) -> its class; the built-in tasks' options
# are configs/task/<name>.yaml
TASKS: dict[str, type[Task]] = {
    task.name: task for task in (LanguageModelling, Classification, Seq2Seq, QuestionAnswering, Chat, Preference, RL)
}


def register(task: type[Task], options: dict[str, Any] | None = None) -> None:
    """Make `task` choosable by its name: `task=<task.name>` composes the Hydra option {name, **options}
    (keys of TaskConfig, over its defaults), and checkpoints whose task.json names it load as `task`."""
    TASKS[task.name] = task
    ConfigStore.instance().store(group="task", name=task.name, node={"name": task.name, **(options or {})})


def task_class(name: str) -> type[Task]:
    """The class of the task named `name`; UserError for a name no task has."""
    if name not in TASKS:
        raise UserError(f"task: '{name}' is not a known task; choose from {', '.join(map(str, TASKS))}")
    return TASKS[name]


def task_for(info: TaskInfo, tokenizer: Tokenizer, max_seq_len: int, special: SpecialTokens) -> Task:
    """The task with the model's own special tokens (end of text, BOS) and chat template."""
    task = task_class(info.name)
    return task(info, tokenizer, max_seq_len, special.end_of_text, special.chat_template, special.bos, special.adds_bos)


def build_task_info(cfg: TaskConfig, data_fields: dict[str, str], train_records: list[dict] | None) -> TaskInfo:
    """The task's record fields, what it learns from the training records (labels) and its settings."""
    return task_class(cfg.name).build_info(cfg, data_fields, train_records)
