"""Chat conversations: rendered with the model's Jinja chat template (in the sandboxed environment
`transformers` renders them in) and tokenized as `transformers`' apply_chat_template tokenizes them, with a
mask of the assistant's tokens, whatever the template.

The whole conversation is rendered once, as the model sees it (a template may trim or rewrite the content:
Llama 3's `| trim`, Qwen3 dropping earlier turns' reasoning), and tokenized in one pass with the template's
special tokens recognised. Where each message's content lies in that text is found by rendering the same
template with a placeholder per content (the template's skeleton) and matching its literal text. A special
token's spelling inside a message ("<|im_end|>" written by a user) stays plain text: such a conversation is
re-tokenized with only the template's own special tokens recognised, so a user cannot end a turn.

Rendering itself, in a bounded sandbox, is lmtrain.data.chat_template. The trained tokens are those of
{% generation %}...{% endgeneration %} blocks where the template has them
(the transformers/TRL markup), else each assistant turn's content and what the template closes the turn with
(<|im_end|>, <|eot_id|>), up to the template's trailing whitespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from lmtrain.data.chat_template import ChatError, render, render_marked

ROLES = ("system", "user", "assistant")
# lmtrain's own tokenizers have no chat tokens: plain-text role headers, each turn ended by <|endoftext|>
DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template trims or escapes them


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


def _unmark(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """`marked` without its {% generation %} markers, and the (start, end) of each block in the result."""
    text, spans, position, start = [], [], 0, 0
    for piece in re.split("([\ue002\ue003])", marked):
        if piece == "\ue002":
            start = position
        elif piece == "\ue003":
            spans.append((start, position))
        else:
            text.append(piece)
            position += len(piece)
    return "".join(text), spans


UNFAITHFUL = "the chat template renders this conversation in a way lmtrain cannot map back to its messages"
Spans = list[tuple[int, int]]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _inside(start: int, end: int, spans: Spans) -> bool:
    return any(s <= start and end <= e for s, e in spans)


def _any_inside(bounds: np.ndarray, spans: np.ndarray) -> bool:
    """Whether any (start, end) row of `bounds` lies inside one of the sorted, disjoint `spans` [n, 2]."""
    index = np.searchsorted(spans[:, 0], bounds[:, 0], side="right") - 1
    return bool(np.any((index >= 0) & (bounds[:, 1] <= spans[np.maximum(index, 0), 1])))


class ChatEncoder:
    """Conversations -> (ids, mask) for one tokenizer, template and set of special tokens (`special`: bos_token,
    eos_token). Keeps what holds for the whole run: the tokenizer's special ids, each kind of conversation's
    skeleton (the template rendered with a placeholder per content, per sequence of roles)."""

    def __init__(self, tokenizer: Tokenizer, template: str, special: dict[str, str | None]):
        self.tokenizer, self.template, self.special = tokenizer, template, special
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = {token_id for token_id, token in added.items() if token.special}
        self._special_array = np.fromiter(self.special_ids, dtype=np.int64)
        self._skeletons: dict[tuple, tuple[list[str], list[int], dict[int, tuple[int, int]]]] = {}

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return render(self.template, messages, add_generation_prompt, self.special)

    def _skeleton(self, messages: list[dict], add_generation_prompt: bool):
        """(literal texts, message index of each placeholder between them, per assistant message the number of
        characters before and after its placeholder that belong to its turn: after the generation prompt, up
        to the end of turn) of the template for conversations shaped like `messages`."""
        shape = tuple(
            tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in m.items() if k != "content"))
            for m in messages
        )
        key = (add_generation_prompt, shape)
        if key in self._skeletons:
            return self._skeletons[key]
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        placeholders = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        skeleton = self._render(placeholders, add_generation_prompt)
        parts = _PLACEHOLDER.split(skeleton)
        literals, order = parts[0::2], [int(i) for i in parts[1::2]]
        turns: dict[int, tuple[int, int]] = {}
        for i in (i for i in order if messages[i]["role"] == "assistant"):
            if order.count(i) != 1:
                raise ChatError("the chat template does not render every assistant message once")
            start, k = skeleton.index(marks[i]), order.index(i)
            header = self._render(placeholders[:i], True)
            lead = start - len(header) if skeleton.startswith(header) and len(header) <= start else 0
            turn = self._render(placeholders[: i + 1], False).rstrip()
            close = turn[turn.rfind(marks[i]) + len(marks[i]) :]
            if marks[i] not in turn or not literals[k + 1].startswith(close):
                raise ChatError("the chat template does not render a conversation as the sum of its turns")
            turns[i] = lead, len(close)
        if len(self._skeletons) > 4096:
            self._skeletons.clear()
        self._skeletons[key] = literals, order, turns
        return literals, order, turns

    def template_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The text the template writes around the contents of `messages`, less its special tokens' spellings
        (ChatError where the template refuses the conversation)."""
        text = "".join(self._skeleton(messages, add_generation_prompt)[0])
        for token in self.tokenizer.get_added_tokens_decoder().values():
            text = text.replace(token.content, "")
        return text

    def _regions(self, text: str, messages: list[dict], add_generation_prompt: bool, order: list[int]) -> Spans:
        """Where each placeholder's message lies in `text`, for a template that rewrites content: the part of
        the text that changes when that content alone is replaced (ChatError where that reaches another
        message's part)."""
        spans: Spans = []
        for i in order:
            mark = f"\ue000{i}\ue001"
            changed = [*messages[:i], {**messages[i], "content": mark}, *messages[i + 1 :]]
            other = self._render(changed, add_generation_prompt)
            head = _common_prefix(text, other)
            tail = _common_prefix(text[head:][::-1], other[head:][::-1])
            if mark not in other[head : len(other) - tail] or (spans and spans[-1][1] > head):
                raise ChatError(UNFAITHFUL)  # the change reaches another message
            spans.append((head, len(text) - tail))
        return spans

    def _layout(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, Spans, Spans]:
        """(the rendered text, each rendered content's span in it, the spans of the text to train on)."""
        text, generation = _unmark(render_marked(self.template, messages, add_generation_prompt, self.special))
        literals, order, turns = self._skeleton(messages, add_generation_prompt)
        contents, position, pieces = [], len(literals[0]), [literals[0]]
        for i, literal in zip(order, literals[1:], strict=True):
            contents.append((position, position + len(messages[i]["content"])))
            pieces += [messages[i]["content"], literal]
            position += len(messages[i]["content"]) + len(literal)
        rewritten = "".join(pieces) != text
        if rewritten:
            contents = self._regions(text, messages, add_generation_prompt, order)
        if generation:
            return text, contents, generation
        trained = []
        for (start, end), i in zip(contents, order, strict=True):
            if i in turns:
                lead, close = turns[i]
                if rewritten:  # the generation prompt as rendered for this conversation
                    header = self._render(messages[:i], True)
                    lead = start - len(header) if text.startswith(header) and len(header) <= start else 0
                trained.append((start - lead, end + close))
        if len(trained) != sum(m["role"] == "assistant" for m in messages):
            raise ChatError("the chat template does not render every assistant message once")
        return text, contents, trained

    def _encode(self, texts: list[str], specials: bool) -> list[Encoding]:
        """Encodings of `texts`; with `specials`, special-token spellings become those tokens."""
        plain = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = not specials
        try:
            return self.tokenizer.encode_batch(texts, add_special_tokens=False)
        finally:
            self.tokenizer.encode_special_tokens = plain

    def _content_as_text(self, text: str, encoding: Encoding, contents: Spans) -> tuple[list[int], Spans]:
        """`text` tokenized with only the template's special tokens recognised: plain text between them."""
        cuts = [
            (token, a, b)
            for token, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
            if token in self.special_ids and not _inside(a, b, contents)
        ]
        starts, stops = [0] + [b for _, _, b in cuts], [a for _, a, _ in cuts] + [len(text)]
        pieces = self._encode([text[s:e] for s, e in zip(starts, stops, strict=True)], False)
        ids: list[int] = []
        offsets: Spans = []
        for start, piece, cut in zip(starts, pieces, [*cuts, None], strict=True):
            ids += piece.ids
            offsets += [(start + a, start + b) for a, b in piece.offsets]
            if cut is not None:
                ids.append(cut[0])
                offsets.append(cut[1:])
        return ids, offsets

    def encode(
        self, conversations: Sequence[list[dict]], add_generation_prompt: bool = False
    ) -> list[tuple[list[int], list[bool]] | ChatError]:
        """For each conversation (checked by `check_messages`), its (ids, mask) — mask[i] True for a token
        trained on — or the ChatError that rules it out. Tokenized in one batch."""
        layouts: list = []
        for messages in conversations:
            try:
                layouts.append(self._layout(messages, add_generation_prompt))
            except ChatError as err:
                layouts.append(err)
        encodings = iter(self._encode([x[0] for x in layouts if not isinstance(x, ChatError)], True))
        results: list[tuple[list[int], list[bool]] | ChatError] = []
        for layout in layouts:
            if isinstance(layout, ChatError):
                results.append(layout)
                continue
            text, contents, trained = layout
            encoding = next(encodings)
            ids, offsets = encoding.ids, encoding.offsets
            bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            specials = bounds[np.isin(np.asarray(ids, dtype=np.int64), self._special_array)]
            if contents and _any_inside(specials, np.asarray(contents, dtype=np.int64)):
                ids, offsets = self._content_as_text(text, encoding, contents)
                bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            mask = np.zeros(len(ids), dtype=bool)
            for start, end in trained:  # a token overlapping a trained span is trained
                mask |= (bounds[:, 0] < end) & (bounds[:, 1] > start)
            results.append((ids, mask.tolist()))
        return results


def tokenize(
    tokenizer: Tokenizer,
    template: str,
    messages: list[dict],
    special: dict[str, str | None],
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """(ids, mask) of one conversation (see `ChatEncoder.encode`); raises its ChatError."""
    result = ChatEncoder(tokenizer, template, special).encode([messages], add_generation_prompt)[0]
    if isinstance(result, ChatError):
        raise result
    return result
