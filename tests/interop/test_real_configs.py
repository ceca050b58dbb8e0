"""HF interop on the configurations real checkpoints ship, shrunk to tiny sizes with their real fields.

Llama 3.2 1B (tied, rope_theta 5e5, llama3 scaling, explicit head_dim, eos lists), Qwen2.5 0.5B / 7B
(q/k/v bias, tied / untied, rope_theta 1e6, use_sliding_window false with a sliding_window set),
Mistral v0.3 (no sliding window) and Mistral-Nemo (head_dim != hidden_size / heads); configs as
transformers 5 writes them and as transformers 4.x wrote them (rope_scaling + rope_theta,
torch_dtype); bf16 / fp16 sharded checkpoints; to_hf back into transformers; greedy decoding;
tokenizer folders as the Hub ships them (tokenizer_config.json with the chat template and
added_tokens_decoder, generation_config.json with an eos list) against transformers' tokenizers;
and the CLI (`generate --hf`, `convert`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmstack  # noqa: E402
from lmstack.data.tokenizer import Tokenizer  # noqa: E402
from lmstack.interop import from_hf, to_hf  # noqa: E402
from tokenizers import AddedToken, processors  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from ..hf_models import hf_rope, load_hf, rope_as_4x  # noqa: E402
from ..hf_tokenizers import LLAMA3_RE, QWEN_RE, byte_level_bpe, sentencepiece_bpe  # noqa: E402

V = 256
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
              hidden_act="silu", initializer_range=0.02)
# name -> (family, config fields), each the real checkpoint's values where a tiny model can keep them
CONFIGS = {
    "llama3.2-1b": ("llama", dict(
        num_key_value_heads=1, head_dim=16, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=True, rms_norm_eps=1e-5, attention_bias=False,
        mlp_bias=False, pretraining_tp=1, bos_token_id=250, eos_token_id=[251, 252, 253])),
    "qwen2.5-0.5b": ("qwen2", dict(
        num_hidden_layers=3, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False, sliding_window=4, max_window_layers=2,
        rms_norm_eps=1e-6, bos_token_id=250, eos_token_id=251)),
    "qwen2.5-7b": ("qwen2", dict(
        num_key_value_heads=1, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=4, max_window_layers=2, rms_norm_eps=1e-6,
        bos_token_id=250, eos_token_id=251)),
    "mistral-v0.3": ("mistral", dict(
        num_key_value_heads=1, head_dim=None, max_position_embeddings=32768, rope_theta=1000000.0,
        sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # Nemo: head_dim 128 with hidden 5120 / 32 heads (= 160); max_position_embeddings shrunk from 1024000
    "mistral-nemo": ("mistral", dict(
        num_key_value_heads=2, head_dim=32, max_position_embeddings=131072, rope_theta=1000000.0,
        sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM")}


def _hf_model(name, *, scale=3.0, seed=0, **over):
    """A random tiny HF model of config ``name`` (2-D weights x ``scale``: peaked distributions)."""
    family, fields = CONFIGS[name]
    cfg_cls, model_cls = (getattr(transformers, c) for c in CLASSES[family])
    torch.manual_seed(seed)
    hf = model_cls(cfg_cls(**{**COMMON, **fields, **over})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return hf


def _as_4x(path: Path) -> None:
    """Rewrite config.json as transformers 4.x wrote it: rope_theta + rope_scaling (null when plain),
    torch_dtype, no layer_types; Qwen2 keeps its (unused) sliding_window number."""
    cfg = json.loads((path / "config.json").read_text())
    if "rope_parameters" in cfg:  # (a transformers 4.x wrote rope_theta + rope_scaling itself)
        cfg.update(rope_as_4x(cfg.pop("rope_parameters")))
    cfg["torch_dtype"] = cfg.pop("dtype", cfg.get("torch_dtype"))
    cfg.pop("layer_types", None)
    if cfg["model_type"] == "qwen2" and cfg.get("sliding_window") is None:
        cfg["sliding_window"] = 4
    cfg["transformers_version"] = "4.46.0"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def _save(hf, path: Path, *, spelling="5.x", dtype=None, **kw) -> Path:
    if dtype is not None:
        hf = hf.to(dtype)
    hf.save_pretrained(path, **kw)
    if dtype is not None:
        hf.float()
    if spelling == "4.x":
        _as_4x(path)
    return path


def _max_diff(m, hf, x, offset=0):
    """max |lmstack - HF| logits for ids ``x`` at positions offset..offset+T-1, and HF's max |logit|."""
    pos = torch.arange(offset, offset + x.shape[1])
    with torch.no_grad():
        ours = m(x, positions=pos if offset else None).float()
        theirs = hf(x, position_ids=pos[None].expand(x.shape[0], -1)).logits.float()
    return (ours - theirs).abs().max().item(), theirs.abs().max().item()


def _head_dim(hc) -> int:
    return getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads


def _no_special(hf):
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        setattr(hf.generation_config, name, None)
    return hf


# -- checkpoints in: logits ------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["5.x", "4.x"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_hf_real_config_logits(tmp_path, seed, name, spelling):
    hf = _hf_model(name, seed=seed)
    path = _save(hf, tmp_path / "hf", spelling=spelling)
    m = from_hf(path)
    c, hc = m.config, hf.config
    assert (c.tie_embeddings, c.qkv_bias, c.head_dim, c.sliding_window) == (
        hc.tie_word_embeddings, CONFIGS[name][0] == "qwen2", _head_dim(hc), None)
    assert c.rope_theta == hf_rope(hc)["rope_theta"]
    theirs = load_hf(path)  # transformers reads the rewritten 4.x file as it read its own
    x = torch.randint(0, V, (2, 24))
    for offset in (0, 20000):  # far positions: llama3 scaling changes the low frequencies there
        for ref in (hf, theirs):
            diff, _ = _max_diff(m, ref, x, offset)
            assert diff <= 1e-4, (offset, diff)


@pytest.mark.parametrize("name,dtype,spelling", [("llama3.2-1b", torch.bfloat16, "5.x"),
                                                 ("qwen2.5-7b", torch.float16, "4.x"),
                                                 ("mistral-nemo", torch.bfloat16, "4.x")])
def test_half_precision_sharded_checkpoints(tmp_path, seed, name, dtype, spelling):
    hf = _hf_model(name, seed=seed)
    path = _save(hf, tmp_path / "hf", spelling=spelling, dtype=dtype, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    x = torch.randint(0, V, (2, 20))
    native = from_hf(path)  # dtype=None: the checkpoint's
    assert {p.dtype for p in native.parameters()} == {dtype}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    assert theirs.dtype == dtype
    diff, top = _max_diff(native, theirs, x)
    assert diff <= 0.02 * top
    ref32 = load_hf(path)
    for dt in (torch.float32, "float32"):
        m32 = from_hf(path, dtype=dt)
        assert {p.dtype for p in m32.parameters()} == {torch.float32}
        assert _max_diff(m32, ref32, x)[0] <= 1e-4
    # and back out, sharded, in the checkpoint's dtype
    out = to_hf(native, tmp_path / "out", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert back.dtype == dtype
    assert _max_diff(native, back, x)[0] <= 0.02 * top
    assert _max_diff(m32, load_hf(out), x)[0] <= 1e-4


# -- checkpoints out -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_to_hf_real_config_reloads_in_transformers(tmp_path, seed, name):
    hf = _hf_model(name, seed=seed)
    m = from_hf(_save(hf, tmp_path / "hf", spelling="4.x"))
    out = to_hf(m, tmp_path / "out", max_shard_bytes=40_000)
    back = load_hf(out)
    a, b = back.config, hf.config
    assert (a.tie_word_embeddings, _head_dim(a), hf_rope(a), getattr(a, "sliding_window", None)) == (
        b.tie_word_embeddings, _head_dim(b), hf_rope(b), getattr(b, "sliding_window", None))
    x = torch.randint(0, V, (2, 24))
    for offset in (0, 20000):
        assert _max_diff(m, back, x, offset)[0] <= 1e-4
        assert _max_diff(from_hf(out), hf, x, offset)[0] <= 1e-4


def test_qwen25_yarn_long_context(tmp_path, seed):
    """Qwen2.5's documented YaRN setup keeps max_position_embeddings at the trained 32768 and adds
    rope_scaling {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32768} for 131072
    tokens; transformers runs past max_position_embeddings. Shrunk: 64 trained, factor 4."""
    hf = _hf_model("qwen2.5-7b", seed=seed, max_position_embeddings=64,
                   rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    path = _save(hf, tmp_path / "hf", spelling="4.x")
    assert json.loads((path / "config.json").read_text())["rope_scaling"]["type"] == "yarn"
    m = from_hf(path)
    for T in (40, 200):  # within the trained context, then within the YaRN-extended one (4 x 64)
        x = torch.randint(0, V, (1, T))
        assert _max_diff(m, hf, x)[0] <= 1e-4, T


# -- greedy decoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_matches_hf(tmp_path, seed, name):
    hf = _hf_model(name, seed=seed)
    path = _save(hf, tmp_path / "hf", dtype=torch.bfloat16)  # as shipped; decoded in fp32
    hf = _no_special(load_hf(path))
    m = from_hf(path, dtype=torch.float32)
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(lmstack.generate(m, ids, 16).sequences, ref)
    eos = [int(ref[0, 6 + 9]), int(ref[0, 6 + 4]), 3]  # an eos list, two of them met on the way
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=eos)
    assert ref.shape[1] < 6 + 16
    assert torch.equal(lmstack.generate(m, ids, 16, eos_token_id=eos).sequences, ref)
    prompts, pad = [torch.randint(1, V, (n,)).tolist() for n in (3, 8, 5)], 0
    x = torch.full((3, 8), pad)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, 8 - len(p):], mask[i, 8 - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    assert torch.equal(lmstack.generate(m, prompts, 10, pad_token_id=pad).sequences, ref)


# -- tokenizer folders as the Hub ships them ----------------------------------------------------------
CORPUS = ["You are a helpful assistant. What is the weather in Paris today? It is sunny, 22 degrees.\n" * 20,
          "system user assistant tool ipython Environment Tools Cutting Knowledge Date Today function "
          "parameters name arguments city get_weather call_id content results " * 20,
          "naïve café 東京 😀 tabs\tand  spaces\n\n12345 " * 10]

# meta-llama/Llama-3.2-1B-Instruct's chat template (tools, date_string via strftime_now, raise_exception)
LLAMA32_TEMPLATE = r'''{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
'''

# Qwen/Qwen2.5-7B-Instruct's chat template (default system prompt, tools, tool calls, tool turns, loop.last)
QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

# mistralai/Mistral-7B-Instruct-v0.3's chat template (alternation check, tools, tool calls with 9-char ids)
MISTRAL_V03_TEMPLATE = r'''{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
'''

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]


def _byte_level(split_re: str, specials: list[str], *, nfc=False) -> HFTokenizer:
    return byte_level_bpe(CORPUS, 420, specials, split_re, nfc=nfc)


def _metaspace(specials: list[str]) -> HFTokenizer:
    """A SentencePiece-converted BPE as Mistral / Llama 2 ship it: Metaspace, byte fallback."""
    return sentencepiece_bpe(CORPUS, specials)


def _added_tokens_decoder(tok: HFTokenizer) -> dict:
    return {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": t.special} for i, t in tok.get_added_tokens_decoder().items()}


def _write_folder(folder: Path, tok: HFTokenizer, config: dict, generation: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": _added_tokens_decoder(tok), **config}, indent=2))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder


def _llama32_folder(folder: Path) -> Path:
    tok = _byte_level(LLAMA3_RE, LLAMA3_SPECIALS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIALS}
    return _write_folder(folder, tok, {
        "bos_token": bos, "chat_template": LLAMA32_TEMPLATE, "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"},
        {"bos_token_id": ids[bos], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
         "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
         "transformers_version": "4.45.0.dev0"})


def _qwen25_folder(folder: Path) -> Path:
    tok = _byte_level(QWEN_RE, QWEN_SPECIALS, nfc=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    return _write_folder(folder, tok, {
        "add_prefix_space": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": QWEN25_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None},
        {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
         "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "repetition_penalty": 1.05, "temperature": 0.7,
         "top_p": 0.8, "top_k": 20, "transformers_version": "4.43.1"})


def _mistral_folder(folder: Path, *, names_in_config=True) -> Path:
    tok = _metaspace(MISTRAL_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"add_bos_token": True, "add_eos_token": False, "chat_template": MISTRAL_V03_TEMPLATE,
              "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 1000000000000000019884624838656,
              "pad_token": None, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
              "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False}
    if names_in_config:
        config.update(names)
    folder = _write_folder(folder, tok, config, {"bos_token_id": 1, "eos_token_id": 2,
                                                 "transformers_version": "4.42.0.dev0"})
    (folder / "special_tokens_map.json").write_text(json.dumps(names))
    return folder


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather <in °C>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CHATS = {
    "llama3.2": [
        ([{"role": "user", "content": "  What is the weather in Paris today?\n"}], {}),
        ([{"role": "system", "content": "You are terse. "}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "naïve café 東京 😀 <|eot_id|>"}], {}),
        ([{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "tool_calls": [CALL]},
          {"role": "tool", "content": {"temperature": 22}}, {"role": "user", "content": "Thanks"}], {"tools": TOOLS}),
        ([{"role": "user", "content": "Weather?"}], {"tools": TOOLS, "tools_in_user_message": False,
                                                     "date_string": "26 Jul 2024"}),
    ],
    "qwen2.5": [
        ([{"role": "user", "content": "What is the weather in Paris today?"}], {}),
        ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " naïve ﬁ café 東京\n\n"}], {}),
        ([{"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]},
          {"role": "tool", "content": "22"}, {"role": "tool", "content": "23"},
          {"role": "assistant", "content": "It is 22 degrees."}], {"tools": TOOLS}),
    ],
    "mistral-v0.3": [
        ([{"role": "user", "content": "What is the weather in Paris today?"}], {}),
        ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "naïve café 東京 😀"}], {}),
        ([{"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "tool_calls": [{**CALL, "id": "abcDEF123"}]},
          {"role": "tool", "tool_call_id": "abcDEF123", "content": "22"},
          {"role": "assistant", "content": "It is 22 degrees."}, {"role": "user", "content": "Thanks"}],
         {"tools": TOOLS}),
    ],
}
REJECTED = {  # conversations each template refuses with raise_exception
    "llama3.2": ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [CALL, CALL]}], {}),
    "qwen2.5": None,
    "mistral-v0.3": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], {}),
}
FOLDERS = {"llama3.2": _llama32_folder, "qwen2.5": _qwen25_folder, "mistral-v0.3": _mistral_folder}


def _ids(out):
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_hub_tokenizer_folders_match_transformers(tmp_path, kind):
    folder = FOLDERS[kind](tmp_path / kind)
    ours, theirs = Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == theirs.chat_template
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    gen = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert ours.stop_ids == list(dict.fromkeys([theirs.eos_token_id, *([gen] if isinstance(gen, int) else gen)]))
    for text in ["Hello world", "  What is\tthe weather?\n\n", "naïve ﬁ café 東京 😀 12345", "[INST] <s> <|im_end|>"]:
        assert ours.encode(text, add_special_tokens=True, parse_special=True) == theirs(text).input_ids
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text, add_special_tokens=False).input_ids)
    for messages, kw in CHATS[kind]:
        for gen_prompt in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False, **kw)
            assert text == theirs.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False, **kw)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, **kw) == _ids(
                theirs.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True, **kw))
    if REJECTED[kind] is not None:
        messages, kw = REJECTED[kind]
        with pytest.raises(Exception) as theirs_err:
            theirs.apply_chat_template(messages, tokenize=False, **kw)
        with pytest.raises(ValueError, match="rejected these messages") as ours_err:
            ours.apply_chat_template(messages, **kw)
        assert str(theirs_err.value) in str(ours_err.value)


@pytest.mark.parametrize("form", ["tokenizer_config list (4.x)", "additional_chat_templates/ (5.x)"])
def test_named_tool_use_template_is_used_with_tools(tmp_path, form):
    """Checkpoints with several named templates (Hermes-2-Pro, Command-R: "default" + "tool_use"):
    transformers renders "tool_use" when tools are passed, "default" otherwise."""
    folder = _qwen25_folder(tmp_path / "tok")
    default = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if form.startswith("tokenizer_config"):
        cfg["chat_template"] = [{"name": "default", "template": default}, {"name": "tool_use", "template": QWEN25_TEMPLATE}]
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    else:
        del cfg["chat_template"]
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        (folder / "chat_template.jinja").write_text(default)
        (folder / "additional_chat_templates").mkdir()
        (folder / "additional_chat_templates" / "tool_use.jinja").write_text(QWEN25_TEMPLATE)
    ours, theirs = Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for kw in ({}, {"tools": TOOLS}):
        for gen_prompt in (False, True):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False, **kw) == \
                theirs.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False, **kw), kw


def test_continue_final_message_prefill(tmp_path):
    """apply_chat_template(continue_final_message=True): the prompt ends inside the final
    (assistant) message, so the model continues it, as transformers renders it."""
    folder = _qwen25_folder(tmp_path / "tok")
    ours, theirs = Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "It is"}]
    text = theirs.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("It is")
    assert ours.apply_chat_template(messages, tokenize=False, continue_final_message=True) == text


# -- CLI -------------------------------------------------------------------------------------------------
def _force_greedy_token(model, prompt: torch.Tensor, token: int, step: int, *, hf: bool) -> None:
    """Edit ``token``'s LM-head row so greedy decoding of ``prompt`` emits it at new-token ``step``
    (the model is tied or not; ``token`` must not occur in the prompt). Decoding then stops there
    when ``token`` is an EOS id."""
    with torch.no_grad():
        if hf:
            seq = model.generate(prompt, max_new_tokens=step, do_sample=False) if step else prompt
            h = model.model(seq).last_hidden_state[0, -1]
            top = model.lm_head(h).max()
        else:
            seq = lmstack.generate(model, prompt, step).sequences if step else prompt
            logits, h = model(seq, return_hidden=True)
            h, top = h[0, -1], logits[0, -1].max()
        model.lm_head.weight[token] = h * (top + 2.0) / h.dot(h)


def test_cli_generate_hf_llama32_instruct(tmp_path, capsys, seed):
    """`lmstack generate --hf` on a Llama-3.2-Instruct-style folder: the reply equals transformers'
    greedy reply on its own chat ids, stopping at <|eom_id|> from generation_config's eos list."""
    from lmstack.cli import main

    folder = _llama32_folder(tmp_path / "model")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    hf = _no_special(_hf_model("llama3.2-1b", seed=seed, vocab_size=len(theirs), bos_token_id=gen["bos_token_id"],
                               eos_token_id=gen["eos_token_id"]))
    user = [{"role": "user", "content": "What is the weather in Paris today?"}]
    ids = torch.tensor([_ids(theirs.apply_chat_template(user, add_generation_prompt=True, tokenize=True))])
    eom = theirs.convert_tokens_to_ids("<|eom_id|>")
    _force_greedy_token(hf, ids, eom, 5, hf=True)
    hf.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(gen))  # the Hub's file, not the model's
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] < ids.shape[1] + 12 and out[0, -1] == eom  # stopped on the eos list
    reply = theirs.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    capsys.readouterr()  # the seed fixture's line
    argv = ["generate", "--hf", str(folder), "--prompt", user[0]["content"], "--temperature", "0",
            "--max-new-tokens", "12", "--device", "cpu"]
    assert main([*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out == reply + "\n"
    assert main(argv) == 0
    assert capsys.readouterr().out == reply + "\n"


def test_cli_convert_round_trip_keeps_hf_generation(tmp_path, seed):
    """`convert --from-hf` then `convert --to-hf` of a bf16 Qwen2.5-style folder with its tokenizer
    and generation_config: transformers generates the same as on the original."""
    from lmstack.cli import main

    folder = _qwen25_folder(tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    hf = _no_special(_hf_model("qwen2.5-0.5b", seed=seed, vocab_size=len(theirs)))
    ids = torch.tensor([_ids(theirs.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                        add_generation_prompt=True, tokenize=True))])
    _force_greedy_token(hf, ids, gen["eos_token_id"][0], 4, hf=True)
    hf.to(torch.bfloat16).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    assert main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    outs = []
    for path in (folder, tmp_path / "back"):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=10, do_sample=False))
    assert outs[0].shape[1] < ids.shape[1] + 10 and torch.equal(outs[0], outs[1])
    # the checkpoint's bf16 survives both ways (not written back as fp32, twice the size)
    assert from_hf(tmp_path / "back").embed_tokens.weight.dtype == torch.bfloat16
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype="auto")
    assert back.dtype == torch.bfloat16


def test_cli_convert_to_hf_keeps_the_stop_token(tmp_path, seed):
    """`convert --to-hf` of a model trained with lmstack's tokenizer (BOS 0, EOS 1, PAD 2): transformers'
    greedy generation on the export stops where `lmstack generate --checkpoint` does, at EOS."""
    from lmstack.cli import main
    from lmstack.train.checkpoint import load_checkpoint, save_model_dir

    tok = Tokenizer.train(CORPUS, vocab_size=300)
    torch.manual_seed(seed)
    m = lmstack.Transformer(lmstack.ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4,
                                                n_kv_heads=2, ffn_dim=96, max_seq_len=128)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    prompt = torch.tensor([tok.encode("What is the weather", add_bos=True)])
    _force_greedy_token(m, prompt, tok.eos_id, 3, hf=False)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_model_dir(m, ckpt)
    tok.save(ckpt)
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    ours_model, ours_tok = load_checkpoint(ckpt)
    ours = lmstack.generate(ours_model, prompt, 10, eos_token_id=ours_tok.stop_ids).sequences
    assert ours.shape[1] < prompt.shape[1] + 10 and ours[0, -1] == tok.eos_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)
    # and AutoTokenizer reads the export: same ids, and the same special tokens (its tokenizer_config.json)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf_tok("What is the weather").input_ids == tok.encode("What is the weather")


def test_cli_convert_from_hf_keeps_special_tokens_map(tmp_path, seed):
    """A folder whose token names are only in special_tokens_map.json (tokenizer_config.json without
    bos/eos, as older transformers saved it): after `convert --from-hf` the chat prompt still has the
    template's BOS/EOS, as transformers renders it from the original folder."""
    from lmstack.cli import main

    folder = _mistral_folder(tmp_path / "hf", names_in_config=False)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert (theirs.bos_token, theirs.eos_token) == ("<s>", "</s>")
    _hf_model("mistral-v0.3", seed=seed, vocab_size=len(theirs)).save_pretrained(folder)
    messages = CHATS["mistral-v0.3"][1][0]
    expected = _ids(theirs.apply_chat_template(messages, tokenize=True))
    assert Tokenizer.from_file(folder).apply_chat_template(messages) == expected  # read in place: fine
    assert main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "ours")]) == 0
    converted = Tokenizer.from_file(tmp_path / "ours")
    assert (converted.bos_id, converted.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert converted.apply_chat_template(messages) == expected


@pytest.mark.parametrize("kind", ["mistral-v0.3", "llama3.2"])
def test_continue_final_message_through_trimming_templates(tmp_path, kind):
    """Templates that `| trim` the assistant's text (Mistral, Llama 3.2): the prompt ends where the
    trimmed text does, as in transformers; both libraries refuse it together with a generation prompt."""
    folder = FOLDERS[kind](tmp_path / "tok")
    ours, theirs = Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for reply in ("The weather is", "The weather is  ", " It is\n"):
        messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": reply}]
        text = theirs.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        assert ours.apply_chat_template(messages, tokenize=False, continue_final_message=True) == text
        assert ours.apply_chat_template(messages, continue_final_message=True) == _ids(
            theirs.apply_chat_template(messages, tokenize=True, continue_final_message=True))
    with pytest.raises(ValueError, match="not both"):
        ours.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)


def test_named_templates_by_name_and_through_save(tmp_path):
    """chat_template=NAME picks a named template (as transformers' argument does); Tokenizer.save
    writes them to additional_chat_templates/, which transformers and from_file read back."""
    folder = _qwen25_folder(tmp_path / "tok")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    rag = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    cfg["chat_template"] = [{"name": "default", "template": QWEN25_TEMPLATE}, {"name": "rag", "template": rag}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, theirs = Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == QWEN25_TEMPLATE and ours.chat_templates == {"rag": rag}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for name in ("rag", "default", None):
        assert ours.apply_chat_template(messages, chat_template=name, add_generation_prompt=True, tokenize=False) == \
            theirs.apply_chat_template(messages, chat_template=name, add_generation_prompt=True, tokenize=False)
    saved = tmp_path / "saved"
    saved.mkdir()
    ours.save(saved)
    assert (saved / "additional_chat_templates" / "rag.jinja").read_text() == rag
    (saved / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "chat_template"}))
    again, theirs_again = Tokenizer.from_file(saved), transformers.AutoTokenizer.from_pretrained(saved)
    assert (again.chat_template, again.chat_templates) == (ours.chat_template, ours.chat_templates)
    assert again.apply_chat_template(messages, chat_template="rag", tokenize=False) == \
        theirs_again.apply_chat_template(messages, chat_template="rag", tokenize=False)
    ours.chat_template = None  # only named templates left: say which exist
    with pytest.raises(ValueError, match=r"\['rag'\].*chat_template=NAME"):
        ours.apply_chat_template(messages)


def test_to_hf_without_a_tokenizer_writes_null_token_ids(tmp_path, seed):
    """With nothing to say which ids are special, to_hf writes them as null rather than leave
    transformers to LlamaConfig's defaults (bos 1, eos 2), which would stop generation at a
    token that is not EOS here."""
    m = lmstack.Transformer(lmstack.ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                ffn_dim=96, max_seq_len=128)).eval()
    to_hf(m, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == dict.fromkeys(
        ("bos_token_id", "eos_token_id", "pad_token_id"))
    hc = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert (hc.bos_token_id, hc.eos_token_id) == (None, None)


def test_from_hf_dtype_names(tmp_path, seed):
    """dtype takes torch dtypes, their names, the short names and "auto" (the checkpoint's own); an
    unknown name says which are valid."""
    path = _save(_hf_model("qwen2.5-0.5b", seed=seed), tmp_path / "hf", dtype=torch.bfloat16)
    for dtype, want in [("auto", torch.bfloat16), (None, torch.bfloat16), ("bf16", torch.bfloat16),
                        ("torch.float16", torch.float16), ("fp32", torch.float32), (torch.float16, torch.float16)]:
        assert from_hf(path, dtype=dtype).embed_tokens.weight.dtype == want, dtype
    with pytest.raises(ValueError, match=r"dtype='int8'.*bfloat16.*bf16.*auto"):
        from_hf(path, dtype="int8")
