"""task=rl's reward functions: (prompt, completion, record) -> float, by name in task.reward.

Built-in:
  exact_match  1.0 when the completion's answer (task.extract: the whole stripped text, its last number, its
               last \\boxed{...}, or group 1 of task.answer_pattern) equals the record's task.answer_field (as
               numbers when both parse as numbers), else 0.0
  format       1.0 when task.format_pattern matches somewhere in the completion (re.search), else 0.0;
               `regex` is the same reward under the name some recipes give it
  length       minus the completion's length in characters over 100 (a push toward short answers)
  python:FILE:FUNCTION  the user's own function, loaded from FILE (the user's own code, run in this process)
    only when named; it gets the prompt (text or messages), the completion text and the whole record.
A function that raises or returns a non-number stops the run with one line naming it and the record.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmtrain.core.errors import UserError

Reward = Callable[[Any, str, dict], float]
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def extract(completion: str, how: str, pattern: str | None) -> str | None:
    """The answer in `completion` by task.extract (none, last_number, boxed, regex); None: it has none."""
    if how == "none":
        return completion.strip()
    if how == "last_number":
        numbers_found = NUMBER.findall(completion)
        return numbers_found[-1].replace(",", "") if numbers_found else None
    if how == "boxed":
        start = completion.rfind("\\boxed{")
        if start < 0:
            return None
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(completion)):
            depth += {"{": 1, "}": -1}.get(completion[j], 0)
            if depth == 0:
                return completion[i:j].strip()
        return None
    assert pattern is not None, "task.answer_pattern is checked with task.extract=regex"
    found = re.search(pattern, completion)
    return found.group(1).strip() if found and found.group(1) is not None else None


def _same(answer: str, expected: Any) -> bool:
    expected = str(expected).strip()
    try:
        return math.isclose(float(answer), float(expected), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return answer == expected


def builtin(name: str, settings: dict) -> Reward:
    """The built-in reward `name` with the task's settings (extract, answer_pattern, format_pattern,
    answer_field). Raises UserError for an unknown name or a missing setting."""
    if name == "exact_match":
        how, pattern, field = settings["extract"], settings.get("answer_pattern"), settings["answer_field"]

        def exact_match(prompt: Any, completion: str, record: dict) -> float:
            if field not in record:
                raise KeyError(f"the record has no field '{field}' (task.answer_field)")
            answer = extract(completion, how, pattern)
            return float(answer is not None and _same(answer, record[field]))

        return exact_match
    if name in ("format", "regex"):
        if not settings.get("format_pattern"):
            raise UserError(f"task.reward={name}: set task.format_pattern to the regular expression to reward")
        compiled = re.compile(settings["format_pattern"], re.DOTALL)
        return lambda prompt, completion, record: float(compiled.search(completion) is not None)
    if name == "length":
        return lambda prompt, completion, record: -len(completion) / 100
    raise UserError(
        f"task.reward: '{name}' is not a reward; choose exact_match, format (or regex), length or python:FILE:FUNCTION"
    )


def load_user(spec: str) -> Reward:
    """The function FUNCTION of python:FILE:FUNCTION, importing FILE (running the user's code). UserError for
    a missing file, a file that fails to import, or a missing or uncallable name."""
    _, _, rest = spec.partition(":")
    path, _, function = rest.rpartition(":")
    if not path or not function:
        raise UserError(f"task.reward: '{spec}' is not python:FILE:FUNCTION")
    if not Path(path).is_file():
        raise UserError(f"task.reward: '{path}' is not a file")
    module_spec = importlib.util.spec_from_file_location(f"lmtrain_reward_{Path(path).stem}", path)
    assert module_spec is not None and module_spec.loader is not None, "a .py file has a loader"
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's code: any failure is theirs to see, in one line
        raise UserError(f"task.reward: importing {path} failed: {type(err).__name__}: {err}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise UserError(f"task.reward: {path} has no function '{function}'")
    return fn


def names_of(reward: Any) -> list[str]:
    """task.reward (one name or a list) as a list of names."""
    names = [reward] if isinstance(reward, str) else list(reward)
    if not names:
        raise UserError("task.reward: name at least one reward")
    return [str(n) for n in names]


def resolve(names: list[str], settings: dict) -> dict[str, Reward]:
    """Reward name -> function; user files are imported here, only when named."""
    return {name: load_user(name) if name.startswith("python:") else builtin(name, settings) for name in names}


def score(name: str, fn: Reward, prompt: Any, completion: str, record: dict, where: str) -> float:
    """`fn`'s reward of one completion. UserError naming the reward and `where` (the record) when it raises or
    returns something that is not a finite number."""
    try:
        value = fn(prompt, completion, record)
    except UserError:
        raise
    except Exception as err:  # the user's code: any failure is one line naming it and the record
        raise UserError(f"task.reward {name} raised {type(err).__name__}: {err} on {where}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UserError(f"task.reward {name} returned {value!r}, not a finite number, on {where}")
    return float(value)
