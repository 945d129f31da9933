"""Chat messages -> one prompt string, with the tokenizer's chat template or a simple fallback.

A checkpoint's `tokenizer_config.json` (or its `chat_template.jinja`) may carry a Jinja chat template;
it is rendered in a sandboxed Jinja environment, as `transformers` does. A model without one (a
small base model) gets `FALLBACK_TEMPLATE`: role-tagged turns and an open assistant turn, which is
plain text any byte-level tokenizer can encode.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def message_text(content) -> str:
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    return "".join(part.text if hasattr(part, "text") else part["text"] for part in content)


def load_chat_template(model_dir: str | None, tokenizer=None) -> tuple[str, dict]:
    """The model's chat template (or the fallback) and its special-token variables (bos_token, ...)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    specials: dict = {}
    cfg_path = Path(model_dir) / "tokenizer_config.json" if model_dir else None
    if cfg_path is not None and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        template = template or cfg.get("chat_template")
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tok = cfg.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                specials[key] = tok
    jinja = Path(model_dir) / "chat_template.jinja" if model_dir else None
    if not template and jinja is not None and jinja.is_file():  # where transformers >= 4.43 saves it
        template = jinja.read_text()
    if isinstance(template, list):  # HF allows a list of named templates; take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return (template or FALLBACK_TEMPLATE), specials


def template_writes_special_tokens(template: str) -> bool:
    """Whether a prompt rendered with `template` already holds its special tokens. A checkpoint's own
    template writes them (`{{ bos_token }}`...), so its text is tokenized without adding more, as
    transformers' `apply_chat_template(tokenize=True)` and vLLM do (else Mixtral's chat prompt starts
    with two BOS). The fallback knows no special tokens: the tokenizer adds its usual ones."""
    return template != FALLBACK_TEMPLATE


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(messages: list[dict], template: str, specials: dict | None = None,
                add_generation_prompt: bool = True) -> str:
    """Render `[{"role", "content", "name"?}]` with the template (a `name` given is passed on, as
    transformers passes messages whole); a template error is a ValueError naming it."""
    plain = [{"role": m["role"], "content": message_text(m["content"]),
              **({"name": m["name"]} if m.get("name") is not None else {})} for m in messages]
    try:
        return _compiled(template).render(messages=plain, add_generation_prompt=add_generation_prompt,
                                          **(specials or {}))
    except ValueError:
        raise
    except Exception as exc:  # a template bug or a message the template refuses
        raise ValueError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from exc
