"""Chat prompts: the tokenizer's chat template, or a plain default for tokenizers without one.

Tiny models here use a character tokenizer with no chat template (and no chat special
tokens), so the default is plain text any tokenizer can encode::

    System: You are terse.
    User: 2+2?
    Assistant:
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def resolve_template(tokenizer: PreTrainedTokenizerBase, configured: str | None) -> str:
    """The configured template (Jinja text, or a file holding it), the tokenizer's, or ours.

    A configured value without ``{`` cannot be a template, so it is read as a file name.
    """
    if configured and "{" not in configured:
        try:
            return Path(configured).read_text()
        except OSError as err:
            raise FileNotFoundError(
                f"chat_template: cannot read {configured}: {err.strerror}"
            ) from err
    if configured:
        return configured
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def render_chat(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict[str, str]]
) -> str:
    """The prompt text of a conversation, ending where the assistant's reply starts."""
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    return text
