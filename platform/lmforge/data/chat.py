"""Instruction and chat records as training examples: messages, the chat template, the
assistant-token mask, and rows of examples (packed or one per row).

    record (alpaca / OpenAI messages / ShareGPT conversations)
        ─► messages [{role, content}]           `to_messages` (a bad record: RecordError)
        ─► token ids + assistant mask           `render`: the tokenizer's chat template,
                                                 `apply_chat_template(..., return_assistant_
                                                 tokens_mask=True)`, so the mask is exactly
                                                 the tokens the template's
                                                 `{% generation %}` blocks produced
        ─► rows of block_size + 1 tokens        `RowPacker`: greedy, in record order

A row is an int32 array (3, block_size + 1): token ids, position ids and the loss mask
(1 where the token is one the model must predict: an assistant token, never an example's
first). Position ids restart at 0 for each example; transformers reads a restart as the
start of another sequence and keeps attention inside each one (`find_packed_sequence_
indices`, used by GPT-2 and Llama with sdpa and eager), so packed examples never see each
other, provided the forward pass keeps no KV cache (`use_cache=False`: with a cache,
transformers does not look for restarts). Padding after the last example continues its
positions, so a row holding one example is an ordinary causal sequence (no mask work at
all) and the padding, masked out of the loss and after every real token, changes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOKENS, POSITIONS, LOSS = 0, 1, 2
"""The three channels of a stored row."""

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "<|assistant|>\n"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else -%}\n"
    "<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}\n"
    "{% endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "<|assistant|>\n"
    "{% endif -%}"
)
"""lmforge's template for a tokenizer without one: `<|role|>` and a newline before each
turn; the reply and the end-of-text token after it are the assistant's tokens, so a model
learns to stop, and `lmforge serve` stops at that token."""


class RecordError(ValueError):
    """A record that is not an instruction or chat example; the message names the field."""


def _text(value: Any, name: str, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise RecordError(f"{name}: {what}")
    return value


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The record as chat messages; RecordError naming the field when it is not one."""
    if fmt == "instruction":
        instruction = _text(record.get("instruction"), "instruction")
        extra = _text(record.get("input"), "input", optional=True)
        system = _text(record.get("system"), "system", optional=True)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user",
                         "content": f"{instruction}\n\n{extra}" if extra else instruction})
        messages.append({"role": "assistant", "content": _text(record.get("output"), "output")})
        return messages
    if record.get("messages") is not None:
        name, role_key, content_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif record.get("conversations") is not None:
        name, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise RecordError("messages: missing (a chat record holds `messages` or "
                          "`conversations`)")
    turns = record[name]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{name}: not a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{name}[{i}]: not an object")
        role = turn.get(role_key)
        if role not in roles:
            raise RecordError(f"{name}[{i}].{role_key}: {role!r} is not one of "
                              f"{', '.join(roles)}")
        messages.append({"role": roles[role],
                         "content": _text(turn.get(content_key), f"{name}[{i}].{content_key}")})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"{name}: no assistant turn (nothing to learn from)")
    return messages


def record_texts(record: dict[str, Any], fmt: str, template: str) -> list[str]:
    """The record rendered by `template` (without end-of-text tokens), for training a
    tokenizer on a sample: the template's role markers are then learnt like the words. []
    for a bad record (the stage reports it when it tokenizes)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        messages = to_messages(record, fmt)
    except RecordError:
        return []
    rendered, _ = render_jinja_template([messages], chat_template=template, eos_token="",
                                        bos_token="")
    return rendered


def load_template(value: str | None) -> str | None:
    """`data.chat_template`: a path ending in `.jinja` is read, anything else is the
    template itself."""
    if value is None or not value.strip().endswith(".jinja"):
        return value
    path = os.path.expanduser(value.strip())
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"data.chat_template: cannot read {path!r}: {e.strerror}") from e


def render(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and the assistant mask of one conversation, from the tokenizer's template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if len(ids) != len(mask):
        raise ValueError(f"data.chat_template: {len(ids)} tokens but {len(mask)} mask values")
    return ids, mask


def check_template(tokenizer: Any) -> None:
    """Fail at once (not in a Ray worker, hours later) when the template cannot mark the
    assistant's tokens: it needs `{% generation %}` around each reply."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        _, mask = render(tokenizer, probe)
    except Exception as e:  # a Jinja error, or a template that refuses these roles
        raise ValueError(f"data.chat_template: rendering a user and an assistant turn "
                         f"failed: {e}") from e
    if not any(mask):
        raise ValueError("data.chat_template: the template marks no assistant tokens; wrap "
                         "each assistant reply in {% generation %}...{% endgeneration %} "
                         "(see docs/data.md#chat-templates)")


@dataclass
class Stats:
    """What became of the records, per block of work; summed into the manifest."""

    examples: int = 0
    """Examples stored (after truncation and drops)."""
    truncated: int = 0
    dropped: int = 0
    """Examples not stored: overlong with `overlong: drop`, or with no assistant token left
    after truncation."""
    example_tokens: int = 0
    """Tokens of the stored examples (padding excluded)."""
    loss_tokens: int = 0
    """Of those, the ones the loss is on."""

    def add(self, other: dict[str, int]) -> None:
        for k, v in other.items():
            setattr(self, k, getattr(self, k) + v)


def fit(ids: list[int], mask: list[int], length: int, overlong: str, stats: Stats
        ) -> tuple[list[int], list[int]] | None:
    """One example at most `length` tokens, with its loss mask (never on the first token,
    which no earlier token predicts), or None when it is dropped."""
    if len(ids) > length:
        if overlong == "drop":
            stats.dropped += 1
            return None
        ids, mask = ids[:length], mask[:length]
        stats.truncated += 1
    mask = [0, *mask[1:]]
    if not any(mask):
        stats.dropped += 1
        return None
    stats.examples += 1
    stats.example_tokens += len(ids)
    stats.loss_tokens += sum(mask)
    return ids, mask


@dataclass
class RowPacker:
    """Examples into rows of `length` tokens: with `packing`, each example goes into the
    current row if it fits, else starts the next (greedy, in order: deterministic); without,
    one example per row. Rows come out as (3, length) int32 arrays through `rows()`."""

    length: int
    packing: bool
    pad_id: int
    _row: list[tuple[list[int], list[int]]] = field(default_factory=list)
    _fill: int = 0
    _done: list[tuple[np.ndarray, int]] = field(default_factory=list)

    def add(self, ids: list[int], mask: list[int]) -> None:
        if self._row and (not self.packing or self._fill + len(ids) > self.length):
            self._close()
        self._row.append((ids, mask))
        self._fill += len(ids)

    def _close(self) -> None:
        row = np.zeros((3, self.length), dtype=np.int32)
        row[TOKENS] = self.pad_id
        at = 0
        for ids, mask in self._row:
            n = len(ids)
            row[TOKENS, at:at + n] = ids
            row[POSITIONS, at:at + n] = np.arange(n)
            row[LOSS, at:at + n] = mask
            at += n
        # Padding continues the last example's positions: one sequence to transformers.
        last = len(self._row[-1][0])
        row[POSITIONS, at:] = np.arange(last, last + self.length - at)
        self._done.append((row, at))
        self._row, self._fill = [], 0

    def rows(self, final: bool = False) -> Iterator[tuple[np.ndarray, int]]:
        """Rows finished so far (with `final`, the open one too), each given out once, with
        the number of their tokens that are examples' (not padding)."""
        if final and self._row:
            self._close()
        done, self._done = self._done, []
        yield from done


def batch_tensors(rows: np.ndarray) -> tuple[Any, Any, Any]:
    """Stored rows (n, 3, block_size + 1) -> inputs, labels (-100 off the loss) and position
    ids, each (n, block_size), as int64 tensors."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(rows)).long()
    x, positions = t[:, TOKENS, :-1], t[:, POSITIONS, :-1]
    y = torch.where(t[:, LOSS, 1:] == 1, t[:, TOKENS, 1:], -100)
    return x, y, positions


def read_records(path: str) -> list[dict[str, Any]]:
    """A local .jsonl/.json file's records (for `lmforge.data.examples` and tests)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]
