"""A task's documents and prompts, built as lm-evaluation-harness builds them (`lm_eval.api.task.ConfigurableTask`):
splits read with `datasets.load_dataset(dataset_path, **dataset_kwargs)` from local files only, doc_to_text /
doc_to_target / doc_to_choice as a field name, a Jinja template or a list, few-shot examples drawn by
`random.Random(seed).sample` from the same split, and the context joined with the same delimiters.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Any

import jinja2

from lmtrain.core.errors import UserError
from lmtrain.evals.taskfile import TaskSpec

FEWSHOT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED: the evaluator's fewshot_random_seed
BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    import re

    return re.sub(pattern, repl, string, count=count)


# lm_eval.utils.env: undefined names fail, trailing newlines are kept, and its one extra filter
JINJA = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
JINJA.filters["regex_replace"] = _regex_replace


def _data_files(value: Any, folder: Path) -> Any:
    """Relative data files as lm-evaluation-harness reads them (from the working directory), else beside the YAML."""
    if isinstance(value, dict):
        return {split: _data_files(files, folder) for split, files in value.items()}
    if isinstance(value, list):
        return [_data_files(files, folder) for files in value]
    path = Path(str(value)).expanduser()
    if path.is_absolute() or path.exists() or not (folder / path).exists():
        return str(path)
    return str(folder / path)


def load_splits(spec: TaskSpec) -> Any:
    """The task's DatasetDict, from local files: a builder (json/csv/parquet/text) with data_files, a folder of
    data files, or a folder written by `save_to_disk`. Raises UserError naming the file and key."""
    import datasets

    kwargs = dict(spec.dataset_kwargs)
    if "data_files" in kwargs:
        kwargs["data_files"] = _data_files(kwargs["data_files"], spec.file.parent)
    path = spec.dataset_path
    folder = Path(path).expanduser()
    if not folder.is_absolute() and not folder.exists() and (spec.file.parent / folder).exists():
        folder = spec.file.parent / folder
    if path not in BUILDERS and not folder.exists():
        raise UserError(
            f"{spec.file}: dataset_path: '{path}' is neither a local folder nor one of {', '.join(BUILDERS)} "
            "(lmtrain reads local files only)"
        )
    try:
        if path not in BUILDERS and (folder / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(folder))
        return datasets.load_dataset(path if path in BUILDERS else str(folder), name=spec.dataset_name, **kwargs)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise UserError(f"{spec.file}: dataset_kwargs: {str(err).splitlines()[0]}") from None


class Documents:
    """One task's evaluation documents, few-shot pool and prompt formatting."""

    def __init__(self, spec: TaskSpec, splits: Any):
        self.spec = spec
        eval_split = spec.test_split or spec.validation_split
        self.docs = self._split(splits, eval_split, "test_split" if spec.test_split else "validation_split")
        if not self.docs:
            raise UserError(f"{spec.file}: the split '{eval_split}' has no records")
        self.features = set(self.docs[0])
        # ConfigurableTask.fewshot_docs: fewshot_split, else training, validation, then test docs
        pool_split = spec.fewshot_split or spec.training_split or spec.validation_split or spec.test_split
        key = "fewshot_split" if spec.fewshot_split else "training_split" if spec.training_split else "test_split"
        self.pool = self._split(splits, pool_split, key)
        self.rnd = random.Random(FEWSHOT_SEED)
        self.multiple_input = spec.doc_to_choice is not None and isinstance(self.text(self.docs[0], 0), int)

    def _split(self, splits: Any, name: str | None, key: str) -> list[dict]:
        if name not in splits:
            raise UserError(f"{self.spec.file}: {key}: no split '{name}' (the data has {', '.join(splits)})")
        return [dict(row) for row in splits[name]]

    def _render(self, template: str, doc: dict, index: int, key: str) -> str:
        try:
            return JINJA.from_string(template).render(**doc)
        except jinja2.TemplateError as err:
            raise UserError(f"{self.spec.file}: record {index}: {key}: {err.message}") from None

    def text(self, doc: dict, index: int) -> str | int:
        """ConfigurableTask.doc_to_text: a field, or a template (a number means a choice index: Winogrande)."""
        template = self.spec.doc_to_text
        if isinstance(template, int):
            return template
        if not isinstance(template, str):
            raise UserError(f"{self.spec.file}: doc_to_text: missing (a field name or a template)")
        if template in self.features:
            return self._field(doc, template, index, "doc_to_text")
        text = self._render(template, doc, index, "doc_to_text")
        return ast.literal_eval(text) if text.isdigit() and self.spec.doc_to_choice is not None else text

    def target(self, doc: dict, index: int) -> int | str | list:
        """ConfigurableTask.doc_to_target: a field, a template (digits -> an index, `[...]` -> a list), a list."""
        template = self.spec.doc_to_target
        if isinstance(template, int | list):
            return template
        if not isinstance(template, str):
            raise UserError(f"{self.spec.file}: doc_to_target: missing (a field name or a template)")
        if template in self.features:
            return self._field(doc, template, index, "doc_to_target")
        text = self._render(template, doc, index, "doc_to_target")
        if text.isdigit() and self.spec.doc_to_choice is not None:
            return ast.literal_eval(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text

    def choices(self, doc: dict, index: int) -> list[str]:
        """ConfigurableTask.doc_to_choice: a field, a template evaluating to a list, a list, or a mapping."""
        template = self.spec.doc_to_choice
        if isinstance(template, list):
            choices = template
        elif isinstance(template, dict):
            choices = list(template.values())
        elif isinstance(template, str) and template in self.features:
            choices = self._field(doc, template, index, "doc_to_choice")
        elif isinstance(template, str):
            rendered = self._render(template, doc, index, "doc_to_choice")
            try:
                choices = ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                raise UserError(f"{self.spec.file}: record {index}: doc_to_choice: not a list: {rendered!r}") from None
        else:
            raise UserError(f"{self.spec.file}: doc_to_choice: missing (a field, a template or a list)")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{self.spec.file}: record {index}: doc_to_choice: needs a non-empty list of strings")
        return choices

    def _field(self, doc: dict, name: str, index: int, key: str) -> Any:
        if doc.get(name) is None:
            raise UserError(f"{self.spec.file}: record {index}: {key}: the field '{name}' is missing")
        return doc[name]

    def sample_fewshot(self, doc: dict, n: int) -> list[dict]:
        """ContextSampler.sample (or FirstNSampler): n docs of the pool; the evaluated doc itself is left out
        when the few-shot split is the test split."""
        if n == 0:
            return []
        exclude = self.spec.fewshot_split == self.spec.test_split
        if n + exclude > len(self.pool):
            raise UserError(
                f"{self.spec.file}: num_fewshot: {n} examples asked, the few-shot split has {len(self.pool)}"
            )
        if self.spec.sampler == "first_n":
            return ([d for d in self.pool if d != doc] if exclude else self.pool)[:n]
        if not exclude:
            return self.rnd.sample(self.pool, n)
        drawn = [d for d in self.rnd.sample(self.pool, n + 1) if d != doc][:n]
        if len(drawn) < n:  # the pool repeats the evaluated doc: draw again without every copy
            drawn = self.rnd.sample([d for d in self.pool if d != doc], n)
        return drawn

    def answer(self, doc: dict, index: int) -> str:
        """The answer text of a few-shot example (build_qa_turn: a choice by index, a list's first, or text)."""
        target = self.target(doc, index)
        if isinstance(target, int) and self.spec.doc_to_choice is not None and not self.multiple_input:
            choices = self.choices(doc, index)
            if not 0 <= target < len(choices):
                raise UserError(f"{self.spec.file}: few-shot record: doc_to_target: {target} is not a choice index")
            return choices[target]
        return str(target[0] if isinstance(target, list) else target)

    def context(self, doc: dict, index: int, num_fewshot: int) -> str | list[str]:
        """The prompt: description, few-shot turns (question, target delimiter, answer, few-shot delimiter), then
        the question. Multiple inputs (a choice index as text): one context per choice."""
        spec = self.spec
        prefix = self._render(spec.description, doc, index, "description") if spec.description else ""
        for shot in self.sample_fewshot(doc, num_fewshot):
            question = self.text(shot, -1)
            if self.multiple_input:
                question = self.choices(shot, -1)[int(question)]
            answer = self.answer(shot, -1)
            delimiter = spec.target_delimiter if answer != "" else ""
            prefix += f"{question}{delimiter}{answer}{spec.fewshot_delimiter if answer != '' else ''}"
        question = self.text(doc, index)
        if self.multiple_input:
            return [prefix + choice for choice in self.choices(doc, index)]
        if not isinstance(question, str):
            raise UserError(f"{spec.file}: record {index}: doc_to_text: gives {question!r}, not text")
        return prefix + question
