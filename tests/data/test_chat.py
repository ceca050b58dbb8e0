"""Chat templates and HF tokenizer folders: prompt strings and ids equal transformers'.

Offline: a small byte-level BPE is trained here with chat special tokens and saved as a HF folder
by transformers itself (`save_pretrained`), then read back by both `lmstack.Tokenizer.from_file`
and `AutoTokenizer.from_pretrained`.
"""

import json
import shutil

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

transformers = pytest.importorskip("transformers")

from lmstack.data.chat import render_chat  # noqa: E402
from lmstack.data.tokenizer import Tokenizer  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
THINK = "<think>"  # an added token that is not special: transformers always reads it in text

# Qwen2-style ChatML, with the default system prompt when the chat has none
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama-3-style: header ids, content trimmed, BOS written by the template
LLAMA3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# Exercises the environment: trim_blocks/lstrip_blocks on indented multi-line blocks, namespace,
# loop controls, dict(), tojson with options, strftime_now, raise_exception, tools, reasoning.
FEATURES = """\
{%- set ns = namespace(turns=0, system='') -%}
{%- if tools %}
<|im_start|>system
Tools: {{ tools | tojson(indent=2, sort_keys=True) }}
<|im_end|>
{% endif %}
{%- for m in messages %}
    {%- if m.role == 'system' %}
        {%- set ns.system = m.content %}
        {%- continue %}
    {%- endif %}
    {%- if m.role not in ['user', 'assistant'] %}
        {{- raise_exception('unknown role ' + m.role) }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
<|im_start|>{{ m.role }}{% if ns.system %} [{{ ns.system }}]{% endif %}

    {{ m.content | trim }}
    {% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}
<|im_end|>
    {%- if ns.turns >= 5 %}{% break %}{% endif %}
{% endfor %}
{%- set meta = dict(turns=ns.turns, year=strftime_now('%Y'), note='<a & b>') %}
{{ meta | tojson }}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer in French."},
     {"role": "user", "content": "Good morning"},
     {"role": "assistant", "content": "Bonjour !"},
     {"role": "user", "content": "  and good night?\n"}],
    [{"role": "user", "content": "say <|im_start|> and <|eot_id|> and <think> naïve 東京 😀\n\n"},
     {"role": "assistant", "content": "ok\tdone"},
     {"role": "user", "content": ""}],
]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now>",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def make_backend():
    """A small byte-level BPE whose added tokens include the chat specials and a plain <think>."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["system user assistant You are a helpful assistant. Hello there! " * 20,
              "What is the weather in Paris? Bonjour, good morning and good night.\n" * 20,
              "naïve café 東京 😀 tabs\tand  spaces\n\n" * 10]
    hf.train_from_iterator(corpus, trainer)
    hf.add_tokens([AddedToken(THINK, special=False, normalized=False)])
    return hf


def _save(hf, path, template, **special):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, **special)
    fast.chat_template = template
    fast.save_pretrained(path)
    return path


def make_folders(tmp_path_factory):
    """A ChatML folder (EOS <|im_end|>) and a Llama-3 one (BOS post-processor), by transformers."""
    backend = make_backend()
    chatml = _save(backend, tmp_path_factory.mktemp("chatml"), CHATML,
                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    llama = HFTokenizer.from_str(backend.to_str())
    bos = "<|begin_of_text|>"
    llama.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
        special_tokens=[(bos, llama.token_to_id(bos))])
    llama = _save(llama, tmp_path_factory.mktemp("llama"), LLAMA3,
                  bos_token=bos, eos_token="<|eot_id|>")
    return {"chatml": chatml, "llama3": llama}


def _ids(out):
    """transformers 5 returns a BatchEncoding from tokenize=True; 4.x a list."""
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def _assert_same_chat(ours, theirs, messages, *, hf_template=None, **kw):
    for g in (False, True):
        text = ours.apply_chat_template(messages, add_generation_prompt=g, tokenize=False, **kw)
        assert text == theirs.apply_chat_template(messages, add_generation_prompt=g,
                                                  tokenize=False, chat_template=hf_template, **kw)
        ids = ours.apply_chat_template(messages, add_generation_prompt=g, **kw)
        assert ids == _ids(theirs.apply_chat_template(messages, add_generation_prompt=g,
                                                      tokenize=True, chat_template=hf_template,
                                                      **kw))
        # the template's specials are single tokens, not spelled out in bytes
        for token in SPECIALS:
            assert ids.count(ours.token_to_id(token)) == text.count(token), token


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_chat_template_matches_transformers(folders, kind):
    ours = Tokenizer.from_file(folders[kind])
    theirs = transformers.AutoTokenizer.from_pretrained(folders[kind])
    assert (folders[kind] / "chat_template.jinja").is_file()  # where transformers 5 saves it
    assert ours.chat_template == theirs.chat_template == {"chatml": CHATML, "llama3": LLAMA3}[kind]
    for messages in CONVERSATIONS:
        _assert_same_chat(ours, theirs, messages)
    if kind == "llama3":  # BOS once, written by the template; nothing added on encode
        ids = ours.apply_chat_template(CONVERSATIONS[0])
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1


def test_environment_matches_transformers(folders):
    ours = Tokenizer.from_file(folders["chatml"])
    theirs = transformers.AutoTokenizer.from_pretrained(folders["chatml"])
    ours.chat_template = FEATURES
    reasoning = [{"role": "system", "content": "be brief"},
                 {"role": "user", "content": "  why?  "},
                 {"role": "assistant", "content": None, "reasoning": "because <think>"},
                 *({"role": "user", "content": f"turn {i}"} for i in range(6))]
    # transformers files a message's reasoning under every name its templates read from 5.21 on
    # (as lmstack does); older versions pass messages through as given, so only the rest compare.
    probe = [{"role": "assistant", "content": "x", "reasoning": "r"}]
    aliases = theirs.apply_chat_template(probe, chat_template="{{ messages[0].reasoning_content }}",
                                         tokenize=False) == "r"
    for messages in [*CONVERSATIONS, *([reasoning] if aliases else [])]:
        _assert_same_chat(ours, theirs, messages, hf_template=FEATURES)
        _assert_same_chat(ours, theirs, messages, hf_template=FEATURES, tools=TOOLS)
    text = ours.apply_chat_template(reasoning, tokenize=False)
    assert '"note": "<a & b>"' in text and text.count("<|im_start|>user") == 4  # unescaped; break
    assert "<think>because <think></think>" in text and "None" not in text  # content=None dropped


def test_config_template_forms(folders, tmp_path):
    """tokenizer_config.json's "chat_template" as a string or a named list; the .jinja file wins."""
    src = folders["llama3"]
    for form in (LLAMA3, [{"name": "tool_use", "template": CHATML},
                          {"name": "default", "template": LLAMA3}]):
        path = tmp_path / str(type(form).__name__)
        shutil.copytree(src, path)
        (path / "chat_template.jinja").unlink()
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": form}))
        ours = Tokenizer.from_file(path)
        assert ours.chat_template == LLAMA3
        messages = CONVERSATIONS[2]
        assert (ours.apply_chat_template(messages, tokenize=False)
                == transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
                    messages, tokenize=False))
        (path / "chat_template.jinja").write_text(CHATML)
        assert Tokenizer.from_file(path).chat_template == CHATML


texts = st.lists(st.one_of(st.text(max_size=10), st.sampled_from(
    [*SPECIALS, THINK, "<|", "|>", " ", "\n", "  ", "Hello", " there", "東京"])),
    max_size=12).map("".join)


@pytest.fixture(scope="module")
def pairs(folders):
    return {kind: (Tokenizer.from_file(path), transformers.AutoTokenizer.from_pretrained(path))
            for kind, path in folders.items()}


@settings(max_examples=150, deadline=None)
@given(texts)
def test_encode_matches_transformers(pairs, text):
    for ours, theirs in pairs.values():
        # transformers' defaults: post-processor on, special tokens read from the text
        ids = ours.encode(text, add_special_tokens=True, parse_special=True)
        assert ids == theirs(text).input_ids
        # ours: spelled specials stay text (transformers' split_special_tokens=True)
        assert (ours.encode(text, add_special_tokens=True)
                == theirs(text, split_special_tokens=True).input_ids)
        assert (ours.encode(text)
                == theirs(text, add_special_tokens=False, split_special_tokens=True).input_ids)
        assert ours.encode_batch([text, text + "!"], parse_special=True) == [
            ours.encode(t, parse_special=True) for t in (text, text + "!")]
        assert ours.decode(ours.encode(text)) == text


def test_llama_post_processor_adds_bos(pairs):
    ours, _ = pairs["llama3"]
    assert ours.encode("Hello", add_special_tokens=True)[0] == ours.bos_id
    assert ours.encode("Hello") == ours.encode("Hello", add_special_tokens=True)[1:]
    chatml, _ = pairs["chatml"]
    assert chatml.encode("Hello", add_special_tokens=True) == chatml.encode("Hello")
    with pytest.raises(ValueError, match="not both"):
        ours.encode("Hello", add_bos=True, add_special_tokens=True)


def test_post_processor_beats_config_flags(folders, tmp_path):
    """With a post-processor in tokenizer.json, add_bos_token/add_eos_token are ignored (as in
    transformers 5, which drops them whenever tokenizer.json exists)."""
    path = tmp_path / "flags"
    shutil.copytree(folders["llama3"], path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=False, add_eos_token=True)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, theirs = Tokenizer.from_file(path), transformers.AutoTokenizer.from_pretrained(path)
    for text in ["Hello there", "", "<|eot_id|> x"]:
        ids = ours.encode(text, add_special_tokens=True, parse_special=True)
        assert ids == theirs(text).input_ids


def test_tokenizer_fields(pairs):
    chatml, _ = pairs["chatml"]
    assert chatml.bos_id is None and chatml.eos_id == chatml.token_to_id("<|im_end|>")
    assert chatml.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    assert chatml.stop_ids == [chatml.eos_id]
    llama, _ = pairs["llama3"]
    assert llama.special_tokens == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


def test_render_chat_directly():
    messages = [{"role": "user", "content": "hi"}]
    template = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}{{ x | default('') }}"
    assert render_chat(template, messages, bos_token="<s>", eos_token="</s>") == "<s>hi</s>"
    assert render_chat(template, messages, bos_token="<s>", x=3) == "<s>hi3"
    assert render_chat("{{ bos_token is defined }}", messages) == "False"
    assert render_chat("{{ m | tojson }}", messages, m={"a": "<é>"}) == '{"a": "<é>"}'
    assert render_chat("{{ messages[0].content }}", messages) == "hi"


def test_errors(folders, tmp_path):
    path = tmp_path / "plain"
    shutil.copytree(folders["chatml"], path)
    (path / "chat_template.jinja").unlink()
    ours = Tokenizer.from_file(path)
    with pytest.raises(ValueError, match="no chat_template; set tok.chat_template"):
        ours.apply_chat_template(CONVERSATIONS[0])

    ours.chat_template = FEATURES
    bad = [{"role": "tool", "content": "42"}]
    with pytest.raises(ValueError, match="rejected these messages: unknown role tool$"):
        ours.apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):  # transformers agrees
        transformers.AutoTokenizer.from_pretrained(folders["chatml"]).apply_chat_template(
            bad, chat_template=FEATURES)

    messages = CONVERSATIONS[0]
    with pytest.raises(ValueError, match="syntax error on line 2"):
        render_chat("ok\n{% for m in messages %}", messages)
    with pytest.raises(ValueError, match="SecurityError"):  # the sandbox holds
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", messages)
    with pytest.raises(ValueError, match="SecurityError.*underscore"):
        render_chat("{% set ns = namespace(_x=1) %}", messages)
    with pytest.raises(ValueError, match="non-empty list"):
        render_chat(CHATML, [])
    with pytest.raises(ValueError, match="each message must be a dict"):
        render_chat(CHATML, [CONVERSATIONS[0]])  # a batch of chats is not one chat


def test_cli_generate_uses_the_chat_template(folders, tmp_path, capsys):
    """`lmstack generate --hf DIR`: with a chat template in the folder the prompt becomes the user's
    turn (after an optional --system one), rendered as transformers renders it, and the greedy reply
    equals HF generate's on those ids; --raw continues the text itself; misuse is a one-line error."""
    import torch

    from lmstack.cli import main

    folder = tmp_path / "model"
    shutil.copytree(folders["chatml"], folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(theirs), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=128, bos_token_id=None,
        eos_token_id=theirs.convert_tokens_to_ids("<|im_end|>"))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)  # peaked next-token distributions: no near-ties in greedy decoding
    hf.save_pretrained(folder)
    ours = Tokenizer.from_file(folder)

    def hf_reply(messages):
        ids = _ids(theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        return ours.decode(out[0, len(ids):])

    def run(*extra):
        code = main(["generate", "--hf", str(folder), "--prompt", "What is 2 + 2?", "--temperature", "0",
                     "--max-new-tokens", "8", "--device", "cpu", *extra])
        return code, capsys.readouterr()

    user = {"role": "user", "content": "What is 2 + 2?"}
    reply = hf_reply([user])
    assert run("--no-stream")[1].out == reply + "\n"
    assert run()[1].out == reply + "\n"  # streamed: the same reply
    terse = hf_reply([{"role": "system", "content": "You are terse."}, user])
    assert terse != reply  # the system turn changes the prompt the model sees
    assert run("--system", "You are terse.", "--no-stream")[1].out == terse + "\n"
    raw = run("--raw", "--no-stream")[1].out
    assert raw.startswith("What is 2 + 2?") and raw != "What is 2 + 2?" + reply + "\n"
    code, err = run("--raw", "--system", "You are terse.")
    assert code == 2 and "--system needs a chat template, and --raw was given" in err.err
    code, err = run("--bos")
    assert code == 2 and "--bos applies to --raw prompts" in err.err
