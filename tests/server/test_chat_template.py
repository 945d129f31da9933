"""Chat prompts: the checkpoint's Jinja chat template when it has one, the fallback when not."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moe_serve.server.chat import FALLBACK_TEMPLATE, load_chat_template, render_chat
from moe_serve.server.metrics import balancedness

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_fallback_template_without_tokenizer_config(tmp_path):
    template, specials = load_chat_template(str(tmp_path))
    assert template == FALLBACK_TEMPLATE and specials == {}
    text = render_chat(MESSAGES, template)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"
    assert not render_chat(MESSAGES, template, add_generation_prompt=False).endswith("<|assistant|>\n")


def test_checkpoint_template_and_special_tokens(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    loaded, specials = load_chat_template(str(tmp_path))
    assert loaded == template and specials == {"bos_token": "<s>", "eos_token": "</s>"}
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat(parts, loaded, specials) == "<s>[user] ab</s>[assistant] "


def test_template_from_chat_template_jinja(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    template, _ = load_chat_template(str(tmp_path))
    assert render_chat(MESSAGES, template) == "Be brief.|Hi!|"


def test_a_messages_name_reaches_the_template():
    """OpenAI's `name` of a participant was dropped before rendering (only role and content were kept),
    so a template that shows it ('{{ m.name }}: ...', as transformers passes messages whole) lost it."""
    template = ("{% for m in messages %}{{ m['role'] }}{% if m.name %} ({{ m.name }}){% endif %}: "
                "{{ m['content'] }}\n{% endfor %}")
    messages = [{"role": "user", "content": "hi", "name": "ann"}, {"role": "user", "content": "yo", "name": None}]
    assert render_chat(messages, template) == "user (ann): hi\nuser: yo\n"


def test_template_errors_are_value_errors(tmp_path):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    with pytest.raises(ValueError, match="first message must be user"):
        render_chat(MESSAGES, strict)
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat(MESSAGES, "{{ messages[5]['content'].upper() }}")


def test_balancedness_is_mean_over_max_per_layer():
    load = np.array([[4, 4, 4, 4], [8, 0, 0, 0], [0, 0, 0, 0]])
    assert balancedness(load).tolist() == [1.0, 0.25, 1.0]
