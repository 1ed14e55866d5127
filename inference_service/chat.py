"""Chat messages -> prompt, with the base model's own chat template (transformers' Jinja renderer).

The template is the tokenizer's (``chat_template`` in tokenizer_config.json / chat_template.jinja),
or a file the operator names with ``--chat-template``. Without either, a chat request is refused:
guessing a format would produce prompts the model was never trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loramerge_common.errors import InvalidArgument, shown

MAX_MESSAGES = 1024


class ChatTemplate:
    """Renders messages with a Hugging Face tokenizer's ``apply_chat_template``."""

    def __init__(self, tokenizer, template: str | None) -> None:
        self._tokenizer = tokenizer
        self.template = template

    @classmethod
    def load(cls, model: str, template_file: Path | None = None) -> ChatTemplate:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        template = template_file.read_text() if template_file is not None else tokenizer.chat_template
        return cls(tokenizer, template or None)

    @property
    def available(self) -> bool:
        return self.template is not None

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._tokenizer.all_special_ids)

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered chat text; the template wrote any special tokens itself."""
        return self._tokenizer(text, add_special_tokens=False).input_ids

    def render(self, messages: Sequence[dict], field: str = "messages") -> str:
        """The prompt text for ``messages`` ([{role, content}]) with the assistant's turn opened."""
        if not messages:
            raise InvalidArgument(f"{field} must hold at least one message, got none", field=field)
        if len(messages) > MAX_MESSAGES:
            raise InvalidArgument(
                f"{field} may hold at most {MAX_MESSAGES} messages, got {len(messages)}", field=field
            )
        for i, m in enumerate(messages):
            if not m.get("role"):
                raise InvalidArgument(f"{field}[{i}].role must not be empty", field=f"{field}[{i}].role")
        if self.template is None:
            raise InvalidArgument(
                f"{field}: the base model has no chat template; send a plain prompt, or start the "
                "service with --chat-template FILE",
                field=field,
            )
        try:
            return self._tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # a Jinja error raised by the template itself (e.g. roles must alternate)
            raise InvalidArgument(
                f"{field}: the chat template refused the messages: {shown(str(e), 200, quote=False)}",
                field=field,
            ) from e
