"""Chat and instruction records as documents: tokens plus a loss mask, rendered with the tokenizer's chat template.

A conversation is rendered once by the template. Each assistant turn's span in that text is found by rendering the
conversation up to it with the generation prompt (the span starts where that text ends) and up to and including it
(the span ends there); both must be prefixes of the whole rendering, which is checked, so the span is what a model
served with this template generates for that turn, end-of-turn marker included. The text is then tokenized whole
(fast tokenizers, with character offsets: the tokens `apply_chat_template(tokenize=True)` gives) and a token carries
loss when it starts inside a span; a token crossing a span boundary is counted (`straddling`), never silently
split. The byte tokenizer encodes segment by segment, which is the same thing for bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jinja2.exceptions import TemplateError

from ringtrain.config.data import DataConfig
from ringtrain.data.tokenizer import encode, is_byte_tokenizer
from ringtrain.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")


def messages_problem(messages: Any, field: str) -> str | None:
    """Why a chat record's messages cannot be rendered (one short phrase, the same for records with the same
    fault so that they are counted together), or None."""
    if messages is None:
        return f"have no {field!r} field"
    if not isinstance(messages, list) or not messages:
        return f"have a {field!r} field that is not a non-empty list of {{role, content}} messages"
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return "have a message that is not a {role, content} mapping"
        if m["role"] not in ROLES:
            return f"have a message with role {m['role']!r}, not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return "have a message whose content is not a string"
    return None


class TemplateNotPrefixError(ValueError):
    """The template renders a conversation's beginning differently alone and inside the whole conversation."""


def chat_spans(tokenizer: Any, messages: list[dict[str, Any]], template: str | None) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans [start, end) of its assistant turns)."""

    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt,
                                             chat_template=template)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(messages[:i], True) if i else ""
        end = render(messages[: i + 1], False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise TemplateNotPrefixError(
                "the chat template renders the conversation up to an assistant turn differently from the whole "
                "conversation (e.g. it drops the reasoning of past turns), so assistant spans cannot be located "
                "exactly: use data.chat_template with a template that renders past turns as they were generated")
        spans.append((len(start), len(end)))
    return full, spans


def encode_segments(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(int32 ids, bool loss mask, tokens crossing a span boundary) of `text` with loss on `spans`."""
    if is_byte_tokenizer(tokenizer) or not getattr(tokenizer, "is_fast", False):
        ids, mask, pos = [], [], 0
        for a, b in [*spans, (len(text), len(text))]:
            for piece, loss in ((text[pos:a], False), (text[a:b], True)):
                if piece:
                    tokens = encode(tokenizer, piece)
                    ids.append(tokens)
                    mask.append(np.full(len(tokens), loss))
            pos = b
        if not ids:
            return np.zeros(0, np.int32), np.zeros(0, bool), 0
        return np.concatenate(ids).astype(np.int32), np.concatenate(mask), 0
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), dtype=bool)
    straddling = 0
    for a, b in spans:
        inside = (offsets[:, 0] >= a) & (offsets[:, 0] < b)
        crossing = ((offsets[:, 0] < a) & (offsets[:, 1] > a)) | (inside & (offsets[:, 1] > b))
        mask |= inside
        straddling += int(crossing.sum())
    return np.asarray(enc["input_ids"], dtype=np.int32), mask, straddling


class EncodeRecords:
    """The datasets map function of format chat / instruction: a class, so datasets fingerprints its fields.

    Returns `input_ids` (int32), `loss_mask` (bool) and `problem` ('' or why the record cannot be used; its tokens
    are then empty) per record, and `straddling` (tokens crossing a span boundary).
    """

    def __init__(self, tokenizer: Any, fmt: str, fields: tuple[str, ...], loss_on: str, template: str | None) -> None:
        self.tokenizer = tokenizer
        self.format = fmt
        self.fields = fields
        self.loss_on = loss_on
        self.template = template

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(batch.values())))
        out: dict[str, list] = {"input_ids": [], "loss_mask": [], "problem": [], "straddling": []}
        if self.format == "preference":
            out["chosen_tokens"] = []  # the record's first document (prompt + chosen); the rest is prompt + rejected
        for i in range(n):
            try:
                documents = self.preference(batch, i) if self.format == "preference" else [self.record(batch, i)]
            except (ValueError, TypeError, TemplateError) as err:  # refused by the template (raise_exception)
                documents = [(None, str(err) if isinstance(err, TemplateNotPrefixError) else
                              f"are refused by the chat template ({err})")]
            problem = next((spans for text, spans in documents if text is None), None)
            if problem is not None:
                documents = []
            encoded = [encode_segments(self.tokenizer, text, spans) for text, spans in documents]
            out["input_ids"].append(np.concatenate([e[0] for e in encoded]) if encoded else np.zeros(0, np.int32))
            out["loss_mask"].append(np.concatenate([e[1] for e in encoded]) if encoded else np.zeros(0, bool))
            out["problem"].append(problem or "")
            out["straddling"].append(sum(e[2] for e in encoded))
            if "chosen_tokens" in out:
                out["chosen_tokens"].append(len(encoded[0][0]) if encoded else 0)
        return out

    def preference(self, batch: dict[str, list], i: int) -> list[tuple[str | None, Any]]:
        """[(prompt + chosen, loss spans), (prompt + rejected, loss spans)] of record i, or [(None, problem)].

        Plain text: the prompt string then the response, loss on the response. Chat: a prompt that is a list of
        messages (or a response that is one) is rendered with the template, the prompt's messages followed by the
        response (a string is one assistant message); loss on the response's assistant turns only."""
        prompt_field, chosen_field, rejected_field = self.fields
        prompt = batch[prompt_field][i] if prompt_field in batch else None
        if prompt is None or not isinstance(prompt, (str, list)):
            return [(None, f"have no string or message list in the {prompt_field!r} field")]
        if not prompt:
            # The response would open its document, and a document's first token is never a label: both responses
            # would lose their first token's log-probability.
            return [(None, f"have an empty {prompt_field!r} field (a response needs a prompt before it)")]
        documents = []
        for field in (chosen_field, rejected_field):
            response = batch[field][i] if field in batch else None
            if response is None:
                return [(None, f"have no {field!r} field")]
            if not isinstance(response, (str, list)):
                return [(None, f"have a {field!r} field that is neither a string nor a list of messages")]
            if not response:
                return [(None, f"have an empty {field!r} field (nothing to compare)")]
            if isinstance(prompt, str) and isinstance(response, str):
                documents.append((prompt + response, [(len(prompt), len(prompt) + len(response))]))
                continue
            context = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            reply = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
            problem = messages_problem(context, prompt_field) or messages_problem(reply, field)
            if problem:
                return [(None, problem)]
            if not any(m["role"] == "assistant" for m in reply):
                return [(None, f"have no assistant message in the {field!r} field")]
            text, spans = chat_spans(self.tokenizer, context + reply, self.template)
            before = sum(m["role"] == "assistant" for m in context)  # the prompt's own assistant turns carry no loss
            documents.append((text, spans[before:]))
        return documents

    def record(self, batch: dict[str, list], i: int) -> tuple[str | None, Any]:
        """(text, loss spans) of record i, or (None, problem)."""
        if self.format == "chat":
            (field,) = self.fields
            messages = batch[field][i] if field in batch else None
            problem = messages_problem(messages, field)
            if problem:
                return None, problem
            if self.loss_on == "assistant" and not any(m["role"] == "assistant" for m in messages):
                return None, "have no assistant message (nothing to train on with data.loss_on=assistant)"
            if self.loss_on == "all":
                text, _ = chat_spans(self.tokenizer, messages, self.template)
                return text, [(0, len(text))]
            return chat_spans(self.tokenizer, messages, self.template)
        prompt_field, completion_field = self.fields
        prompt = batch[prompt_field][i] if prompt_field in batch else None
        completion = batch[completion_field][i] if completion_field in batch else None
        for name, value in ((prompt_field, prompt), (completion_field, completion)):
            if not isinstance(value, str):
                return None, f"have no string in the {name!r} field"
        if not completion:
            return None, f"have an empty {completion_field!r} field (nothing to train on)"
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))]


def chat_template_of(cfg: DataConfig, tokenizer: Any) -> str | None:
    """The chat template format='chat' renders with: data.chat_template's file, else the tokenizer's own (refused
    in one line when neither exists)."""
    if cfg.chat_template:
        try:
            with open(cfg.chat_template, encoding="utf-8") as f:
                return f.read()
        except OSError as err:
            raise ConfigError([f"data.chat_template={cfg.chat_template!r}: cannot read it ({err.strerror}): give a "
                               "Jinja template file, or '' for the tokenizer's own"]) from None
    if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError([f"data.format='chat' needs a chat template, and data.tokenizer={cfg.tokenizer!r} has none: "
                           "set data.chat_template to a Jinja template file, or use a tokenizer that ships one "
                           "(an instruct model's)"])
    return None
