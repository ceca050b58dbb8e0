"""More chat-template styles from the wild render and tokenize exactly as transformers does.

test_chat.py covers ChatML, Llama 3 and the jinja environment; these are the other shapes people
fine-tune most: Mistral's [INST] (system merged into the first user turn, alternation enforced with
raise_exception, BOS/EOS written by the template), Gemma (no system role, ``model`` turns),
Zephyr (``eos_token`` after every turn) and Phi-3 (``<|end|>`` markers, EOS at the end when no
reply is asked for). The tokenizer folders come from tests/data/conftest.py.
"""

import pytest

from .test_chat import CONVERSATIONS, _assert_same_chat, _ids

transformers = pytest.importorskip("transformers")

from lmstack.data.tokenizer import Tokenizer  # noqa: E402

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<|im_start|>' + role + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>model\\n'}}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    "{% endfor %}"
)

PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


NO_SYSTEM = [c for c in CONVERSATIONS if c[0]["role"] != "system"]


@pytest.mark.parametrize("name, template, chats", [
    ("mistral", MISTRAL, CONVERSATIONS), ("gemma", GEMMA, NO_SYSTEM),
    ("zephyr", ZEPHYR, CONVERSATIONS), ("phi3", PHI3, CONVERSATIONS)])
@pytest.mark.parametrize("kind", ["chatml", "llama3"])  # EOS <|im_end|> / BOS <|begin_of_text|>
def test_template_styles_match_transformers(folders, kind, name, template, chats):
    """Every conversation of test_chat (all alternate user/assistant) that the style admits."""
    assert len(chats) >= 2
    ours = Tokenizer.from_file(folders[kind])
    theirs = transformers.AutoTokenizer.from_pretrained(folders[kind])
    ours.chat_template = template
    for messages in chats:
        _assert_same_chat(ours, theirs, messages, hf_template=template)
    # prefilling the reply: the text stops at the end of the assistant's words, as transformers'
    prefill = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "Sure, the answer"}]
    text = ours.apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    assert text.endswith("Sure, the answer") and text == theirs.apply_chat_template(
        prefill, continue_final_message=True, tokenize=False, chat_template=template)
    assert ours.apply_chat_template(prefill, continue_final_message=True) == _ids(
        theirs.apply_chat_template(prefill, continue_final_message=True, tokenize=True,
                                   chat_template=template))
    if kind == "llama3" and name in ("mistral", "gemma"):  # BOS once, from the template
        ids = ours.apply_chat_template(chats[0])
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1


@pytest.mark.parametrize("template, messages, why", [
    (MISTRAL, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    (GEMMA, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
     "System role not supported")])
def test_template_refusals_are_one_line(folders, template, messages, why):
    ours = Tokenizer.from_file(folders["chatml"])
    ours.chat_template = template
    with pytest.raises(ValueError, match=why) as err:
        ours.apply_chat_template(messages)
    assert "\n" not in str(err.value)
    with pytest.raises(Exception, match=why):  # transformers refuses them too
        transformers.AutoTokenizer.from_pretrained(folders["chatml"]).apply_chat_template(
            messages, chat_template=template)
