"""How a prompt becomes text before tokenisation (DataConfig.prompt_format): one definition, used by training
tokenisation (tokenize.py, so evaluation too), generation (MoAModel.encode_prompt, so load_run and
`python -m moa_jax.cli.generate`) and recorded in an export's router.json, whose reference_router.py repeats it.

  chat   the tokenizer's chat template over the conversation, with the generation cue:
         apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
  plain  for base models without a chat template (`plain_text`, the one definition):
             bos_token (when the tokenizer has one)
             + each message in order: a system message's content + "\\n\\n" (nothing if it is empty),
                                      any other message's content + "\\n"
         e.g. "<bos>Reply with only the final answer.\\n\\nWhat is 2 + 3?\\n"; roles are not written. The
         response follows and ends with eos, as in every format (tokenize.py).
  auto   chat when the tokenizer has a chat template, else plain. Resolved once the tokenizer is known
         (`resolve_prompt_format`); a run records the resolved value (chat or plain) with its adapters, so
         loading it never guesses again.

The conversation is the example's messages with the system prompt first unless they hold a system turn
(`conversation`). The text is tokenised WITHOUT adding special tokens: the chat template, or the plain format's
bos, writes the ones the format wants. A chat template without a system role (Gemma's folds the system message into
the first user turn) gets the same conversation in training and at inference, so both treat the system prompt
the same way.

No jax or tokenizer import here; no arrays (no shape glossary).
"""
from __future__ import annotations

from typing import Optional, Sequence

from jinja2.exceptions import TemplateError

from moa_jax.data_config import PROMPT_FORMATS
from moa_jax.errors import ConfigError

PLAIN_SYSTEM_END = "\n\n"   # after a system message's content
PLAIN_TURN_END = "\n"       # after any other message's content (the response follows the last one)


def conversation(example: dict, system_prompt: Optional[str]) -> list[dict]:
    """The prompt conversation of an example; a system turn in the example wins over `system_prompt` (None: none)."""
    msgs = example["messages"]
    if system_prompt is not None and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system_prompt}] + list(msgs)
    return list(msgs)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prompt_format(setting: str, tokenizer) -> str:
    """DataConfig.prompt_format with `tokenizer` -> "chat" or "plain" ("auto": chat iff the tokenizer has a chat
    template); "chat" without a template is a ConfigError naming the field."""
    if setting not in PROMPT_FORMATS:
        raise ConfigError(f"data.prompt_format={setting!r} not in {PROMPT_FORMATS}")
    if setting == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if setting == "chat" and not has_chat_template(tokenizer):
        raise ConfigError("data.prompt_format=chat but the tokenizer has no chat template (a base model?): use "
                          "--set data.prompt_format=plain (or auto), or give the tokenizer a chat template")
    return setting


def plain_text(messages: Sequence[dict], bos_token: Optional[str]) -> str:
    """The plain format of a conversation (module docstring); pure."""
    parts = [bos_token or ""]
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"] + PLAIN_SYSTEM_END if m["content"] else "")
        else:
            parts.append(m["content"] + PLAIN_TURN_END)
    return "".join(parts)


def plain_record(tokenizer) -> dict:
    """The plain format's pieces as router.json records them (reference_router.py rebuilds the text from them)."""
    return {"bos_token": tokenizer.bos_token, "system_end": PLAIN_SYSTEM_END, "turn_end": PLAIN_TURN_END,
            "rule": "bos_token (if any) + for each message in order: system: content + system_end (nothing if "
                    "empty); other roles: content + turn_end"}


def prompt_texts(tokenizer, conversations: Sequence[Sequence[dict]], prompt_format: str) -> list[str]:
    """Conversations -> prompt texts in the resolved format ("chat" | "plain")."""
    if prompt_format == "chat":
        try:
            return tokenizer.apply_chat_template([list(c) for c in conversations], tokenize=False,
                                                 add_generation_prompt=True)
        except TemplateError as e:   # e.g. a template without a system role that refuses one
            raise ConfigError(f"the tokenizer's chat template refuses the prompt ({e}); if it has no system role, "
                              f"set data.system_prompt=None (generate: system_prompt=None), or use "
                              f"data.prompt_format=plain") from None
    if prompt_format == "plain":
        return [plain_text(c, tokenizer.bos_token) for c in conversations]
    raise ValueError(f"prompt_texts(prompt_format={prompt_format!r}): resolve the setting first with "
                     f"resolve_prompt_format(setting, tokenizer)")


def prompt_ids(tokenizer, conversations: Sequence[Sequence[dict]], prompt_format: str) -> list[list[int]]:
    """Conversations -> prompt token ids (the format's own special tokens only)."""
    return tokenizer(prompt_texts(tokenizer, conversations, prompt_format), add_special_tokens=False)["input_ids"]
