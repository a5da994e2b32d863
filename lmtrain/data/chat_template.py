"""Rendering a chat template: Jinja's immutable sandbox (the environment `transformers` renders chat templates
in), with `{% generation %}` blocks marked and every way a template builds a large value, or runs long, bounded:
a model folder from elsewhere is untrusted input (docs/untrusted-inputs.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import signal
import threading
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from lmtrain.core.errors import UserError

_GENERATION = re.compile("[\ue002\ue003]")  # where a {% generation %} block opens and closes


class ChatError(ValueError):
    """A conversation that cannot be trained on (a bad role, no assistant turn, a template error)."""


class _Generation(Extension):
    """The {% generation %} block of transformers' templates: its output, between two marker characters."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        return "\ue002" + caller() + "\ue003"


class TemplateRefused(UserError):
    """A chat template that does what no chat template needs (a sandbox violation, output past
    MAX_OUTPUT_CHARS, a render past MAX_RENDER_SECONDS): the model's template is unusable, whatever the data."""


MAX_OUTPUT_CHARS = 1 << 20  # a rendered conversation's template text (message contents are placeholders)
MAX_RENDER_SECONDS = 2.0  # real templates render in milliseconds


class _RenderTimeout(Exception):
    pass


def _too_big(operator: str, left: object, right: object) -> bool:
    """Whether `left operator right` would build a value past MAX_OUTPUT_CHARS (or a number past 4096 bits)."""
    sized = (str, list, tuple)
    if operator == "*":
        return any(
            isinstance(a, sized) and isinstance(b, int) and len(a) * b > MAX_OUTPUT_CHARS
            for a, b in ((left, right), (right, left))
        )
    if operator == "+":
        return isinstance(left, sized) and isinstance(right, sized) and len(left) + len(right) > MAX_OUTPUT_CHARS
    if operator == "%":  # printf-style formatting: a width from the format string or the arguments
        return isinstance(left, str) and _oversized((left, right), {})
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (left, right))
    return numbers and abs(left) > 1 and right * math.log2(abs(left)) > 4096  # type: ignore[operator, arg-type]


_WIDE = re.compile(r"\d{7,}")  # a field width of a million characters or more in a format string


def _oversized(args: tuple, kwargs: dict) -> bool:
    """Whether a call's arguments ask for output past MAX_OUTPUT_CHARS: an integer beyond it (a width, a
    count) or a format string with a 7-digit field width. Looks one level into tuples and lists."""
    values = [*args, *kwargs.values()]
    values += [v for value in values if isinstance(value, tuple | list) for v in value]
    return any(
        (isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_OUTPUT_CHARS)
        or (isinstance(v, str) and ("%" in v or "{" in v) and _WIDE.search(v) is not None)
        for v in values
    )


def _bounded(function):
    """`function` (a Jinja filter) refusing arguments that ask for output past MAX_OUTPUT_CHARS."""

    @functools.wraps(function)  # keeps Jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        if _oversized(args, kwargs):
            raise SecurityError(f"a filter's arguments ask for more than {MAX_OUTPUT_CHARS:,} characters")
        return function(*args, **kwargs)

    return bounded


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class _BoundedConcat(CodeGenerator):
    def visit_Concat(self, node, frame) -> None:  # `a ~ b`: through the environment, to be checked
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (as `transformers` renders chat templates in), with every way a template
    builds a large value bounded by MAX_OUTPUT_CHARS."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})
    code_generator_class = _BoundedConcat

    def call_binop(self, context, operator, left, right):
        if _too_big(operator, left, right):
            raise SecurityError(f"'{operator}' would build a value larger than {MAX_OUTPUT_CHARS:,} characters")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value):  # "...".format: a field width in the format string
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _oversized((value.__self__,), {}):
            raise SecurityError(f"a format string asks for more than {MAX_OUTPUT_CHARS:,} characters")
        return wrapped

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        if _oversized(args, kwargs):
            raise SecurityError(f"a call's arguments ask for more than {MAX_OUTPUT_CHARS:,} characters")
        return super().call(__context, __obj, *args, **kwargs)

    def bounded_concat(self, parts: tuple) -> str:
        texts = [str(part) for part in parts]
        if sum(len(text) for text in texts) > MAX_OUTPUT_CHARS:
            raise SecurityError(f"'~' would build a value larger than {MAX_OUTPUT_CHARS:,} characters")
        return "".join(texts)


def _environment() -> _Sandbox:
    """The sandbox with transformers' chat-template extras ({% generation %}, loop controls, tojson,
    raise_exception, strftime_now) and every filter bounded; no lipsum."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.filters = {name: _bounded(function) for name, function in env.filters.items()}
    env.globals.pop("lipsum", None)  # paragraphs of filler text: no chat template needs them
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


@lru_cache(maxsize=8)
def _compiled(template: str):
    try:
        return _environment().from_string(template)
    except TemplateError as err:
        raise TemplateRefused(f"the chat template does not compile: {_first_line(err)}") from None
    except (RecursionError, MemoryError):
        raise TemplateRefused("the chat template does not compile: it is nested too deeply") from None


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _RenderTimeout in the block after `seconds` (in the main thread; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _RenderTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def render_marked(template: str, messages: list[dict], add_generation_prompt: bool, special: dict) -> str:
    """The template's text for `messages`, {% generation %} blocks between marker characters. A template
    error is a ChatError (that conversation); TemplateRefused for a template no conversation can use."""
    compiled = _compiled(template)
    pieces, size = [], 0
    try:
        with _deadline(MAX_RENDER_SECONDS):
            for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **special):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateRefused(f"the chat template's output passed {MAX_OUTPUT_CHARS:,} characters")
                pieces.append(piece)
    except _RenderTimeout:
        raise TemplateRefused(f"the chat template ran for more than {MAX_RENDER_SECONDS:g} s") from None
    except (SecurityError, OverflowError, RecursionError, MemoryError) as err:
        raise TemplateRefused(f"the chat template did what the sandbox forbids: {_first_line(err)}") from None
    except TemplateRefused:
        raise
    except TemplateError as err:
        raise ChatError(f"the chat template failed: {_first_line(err)}") from None
    except Exception as err:  # a template is a program: any error of it is the template's, one line
        raise ChatError(f"the chat template failed: {type(err).__name__}: {_first_line(err)}") from None
    return "".join(pieces)


def render(template: str, messages: list[dict], add_generation_prompt: bool, special: dict[str, str | None]) -> str:
    """The template's text for `messages`; `special` gives bos_token and eos_token. Raises ChatError with the
    template's own message where it fails (raise_exception, a syntax error), TemplateRefused for a template
    no conversation can use (a sandbox violation, output or time past the limits)."""
    return _GENERATION.sub("", render_marked(template, messages, add_generation_prompt, special))
