"""Chat messages -> prompt, with the base model's own chat template (transformers' Jinja renderer).

The template is the tokenizer's (``chat_template`` in tokenizer_config.json / chat_template.jinja),
or a file the operator names with ``--chat-template``. Without either, a chat request is refused:
guessing a format would produce prompts the model was never trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from loramerge.errors import InvalidArgument, shown

log = logging.getLogger(__name__)

MAX_MESSAGES = 1024


class ChatTemplate:
    """Renders messages with a Hugging Face tokenizer's ``apply_chat_template``."""

    def __init__(self, tokenizer, template: str | None) -> None:
        self._tokenizer = tokenizer
        self.template = template

    @classmethod
    def for_engine(cls, engine, template_file: Path | None = None) -> ChatTemplate:
        """The template of the tokenizer vLLM itself loaded (no second load, nothing fetched), or the
        file's; without a tokenizer the service serves on and refuses chat requests."""
        template = template_file.read_text() if template_file is not None else None
        try:
            tokenizer = engine.tokenizer()
        except Exception:
            log.warning("the engine has no tokenizer: chat requests will be refused", exc_info=True)
            return cls(None, None)
        return cls(tokenizer, template or getattr(tokenizer, "chat_template", None) or None)

    @property
    def available(self) -> bool:
        return self.template is not None

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._tokenizer.all_special_ids) if self._tokenizer is not None else frozenset()

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id]) if self._tokenizer is not None else ""

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
