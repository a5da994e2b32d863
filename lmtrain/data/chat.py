"""Chat conversations: rendered with the model's Jinja chat template (in the sandboxed environment
`transformers` renders them in) and tokenized with a mask of the assistant's tokens, whatever the template.

Each message's content is rendered as a placeholder, so the template's own text (role headers, special tokens
such as <|im_start|>) is encoded with its special tokens while the content is encoded as plain text: a user who
writes "<|im_end|>" cannot end a turn. The tokens trained on for an assistant turn are its content and what
the template closes the turn with (<|im_end|>, <|eot_id|>), up to the template's trailing whitespace.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
# lmtrain's own tokenizers have no chat tokens: plain-text role headers, each turn ended by <|endoftext|>
DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template trims or escapes them


class ChatError(ValueError):
    """A conversation that cannot be trained on (a bad role, no assistant turn, a template error)."""


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool, special: dict[str, str | None]) -> str:
    """The template's text for `messages`; `special` gives bos_token and eos_token."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except TemplateError as err:
        raise ChatError(f"the chat template failed: {err}") from None


def check_messages(messages: object) -> list[dict]:
    """`messages` as a list of {role, content} with known roles; ChatError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list of {role, content}")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ChatError(f"message {number} has no text content")
        if message.get("role") not in ROLES:
            raise ChatError(f"message {number} has role {message.get('role')!r} (roles: {', '.join(ROLES)})")
    return messages


def _encode(tokenizer: Tokenizer, text: str, specials: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets of `text`; with `specials`, special-token spellings become those tokens."""
    if not text:
        return [], []
    plain = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = not specials
    try:
        encoding = tokenizer.encode(text, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = plain
    return encoding.ids, encoding.offsets


def tokenize(
    tokenizer: Tokenizer,
    template: str,
    messages: list[dict],
    special: dict[str, str | None],
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """(ids, mask) of a rendered conversation: mask[i] is True for the tokens of assistant turns (content and
    the template's end of turn). Raises ChatError for a template that does not render messages in order."""
    placeholders = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    full = render(template, placeholders, add_generation_prompt, special)
    spans = []  # (start, end) in `full` of each assistant turn's trained text
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = full.find(f"\ue000{i}\ue001")
        turn = render(template, placeholders[: i + 1], False, special).rstrip()
        if start < 0 or not full.startswith(turn):
            raise ChatError("the chat template does not render a conversation as the sum of its turns")
        spans.append((start, len(turn)))
    ids: list[int] = []
    mask: list[bool] = []
    position = 0
    for piece in [*_PLACEHOLDER.finditer(full), None]:
        text_end = piece.start() if piece is not None else len(full)
        template_ids, offsets = _encode(tokenizer, full[position:text_end], specials=True)
        ids += template_ids
        mask += [any(s <= position + a and position + b <= e for s, e in spans) for a, b in offsets]
        if piece is None:
            break
        content_ids, _ = _encode(tokenizer, messages[int(piece.group(1))]["content"], specials=False)
        ids += content_ids
        mask += [any(s <= piece.start() < e for s, e in spans)] * len(content_ids)
        position = piece.end()
    return ids, mask
