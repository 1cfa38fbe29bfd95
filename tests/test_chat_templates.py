"""``chat_no_system``: the chat template without the system turn it inserts by itself; BOS kept where the
template writes one before the turns, never doubled where BOS is the turn marker (SmolLM2)."""

import pytest
from test_generate_fixtures import char_tokenizer

from meteora_jax.errors import MeteoraInputError
from meteora_jax.eval.composite import render_turns
from meteora_jax.train.config import TrainConfig
from meteora_jax.train.data import PromptFormatter, render_chat

# SmolLM2-135M-Instruct's template as its GGUF ships it: a default system turn when none is given
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3 style: a BOS before the turns, no default system turn
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
NO_SYSTEM_ROLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "{{ m['content'] }}{% endfor %}"
)


def _tok(template: str, bos: str):
    tok = char_tokenizer()
    tok.chat_template = template
    tok.bos_token = bos
    return tok


def test_smollm2_default_system_turn_is_dropped():
    tok = _tok(SMOLLM2, "<|im_start|>")  # SmolLM2's BOS is its turn marker
    msgs = [{"role": "user", "content": "Q?"}]
    assert render_chat(tok, msgs).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert (
        render_chat(tok, msgs, "chat_no_system") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert PromptFormatter(tok, "chat_no_system")("Q?") == render_chat(tok, msgs, "chat_no_system")
    turns = [msgs[0], {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
    assert render_turns(tok, turns, "chat_no_system") == (
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_bos_before_the_turns_is_kept_and_other_templates_fail_clearly():
    tok = _tok(LLAMA3, "<|begin_of_text|>")
    msgs = [{"role": "user", "content": "Q?"}]
    # no default system turn here: chat and chat_no_system agree
    assert render_chat(tok, msgs, "chat_no_system") == render_chat(tok, msgs, "chat")
    assert render_chat(tok, msgs, "chat_no_system").startswith("<|begin_of_text|><|start_header_id|>user")
    with pytest.raises(MeteoraInputError, match="does not take a system turn"):
        render_chat(_tok(NO_SYSTEM_ROLE, "<s>"), msgs, "chat_no_system")
    assert TrainConfig(prompt_template="chat_no_system").prompt_template == "chat_no_system"
