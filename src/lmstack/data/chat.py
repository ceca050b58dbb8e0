"""Chat templates: turn a conversation into the prompt string a chat model was trained on.

A Hugging Face checkpoint ships its chat format as a Jinja template (`chat_template.jinja`, or
"chat_template" in tokenizer_config.json) that transformers' `apply_chat_template` renders with
`messages`, `add_generation_prompt` and the special-token names (`bos_token`, `eos_token`, …) in
scope. We render it in the same environment (sandboxed and immutable because templates come from
the Hub, `trim_blocks`/`lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson`
that does not HTML-escape), so the prompt string, and therefore its token ids, match transformers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from ..io import first_line

try:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:  # pragma: no cover - jinja2 is not a core lmstack dependency
    raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from None

# Older jinja2 releases have known sandbox escapes, and Hub templates are untrusted code.
MIN_JINJA2 = (3, 1, 6)

# Names a message's reasoning comes under; templates read "reasoning_content" (Qwen3, DeepSeek-R1)
# or "thinking" (gpt-oss), so each is filled from whichever the caller set, as transformers does.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                continue_final_message: bool | str = False,
                bos_token: str | None = None, eos_token: str | None = None,
                tools: list[dict] | None = None, documents: list[dict] | None = None,
                **extra: Any) -> str:
    """The prompt string `template` makes of `messages` (dicts with "role" and "content").

    `add_generation_prompt` appends the header that opens an assistant turn.
    `continue_final_message` instead ends the prompt right after the final message's text (its
    "content", or the field it names, e.g. "reasoning_content"), without the turn's closing tokens,
    so the model continues that message (a prefilled reply). `bos_token` and `eos_token` are
    visible to the template when not None; `tools` (JSON schemas), `documents` and any `extra`
    keyword (another special-token name, `enable_thinking=False`, …) are passed through, `extra`
    overriding the token names. A template error, including one the template raises with
    `raise_exception`, becomes a one-line ValueError.
    """
    if not isinstance(template, str):
        raise ValueError(f"a chat template must be a Jinja string, got {type(template).__name__}")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ValueError("tools must be a list of JSON-schema dicts")
    if continue_final_message and add_generation_prompt:
        raise ValueError("pass add_generation_prompt=True to open a new assistant turn, or "
                         "continue_final_message=True to continue the last message, not both")
    compiled = _compile(template)
    variables = {"bos_token": bos_token, "eos_token": eos_token}
    variables = {k: v for k, v in variables.items() if v is not None}
    variables.update(_plain(extra))
    messages = _conversation(messages)
    if continue_final_message:
        _mark_final_text(messages[-1], "content" if continue_final_message is True else continue_final_message)
    try:
        text = compiled.render(messages=messages, tools=_plain(tools), documents=_plain(documents),
                               add_generation_prompt=add_generation_prompt, **variables)
    except _TemplateRaised as e:
        raise ValueError(f"the chat template rejected these messages: {e.message}") from None
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed to render: {type(e).__name__}: "
                         f"{first_line(e)}") from e
    return _cut_after_final_text(text) if continue_final_message else text


# Appended to the final message's text to find where it ends in the rendered prompt. Its last
# character is a space so a template that trims the text (`| trim`) can be told apart from one
# that keeps it: then the text's own trailing whitespace is gone too, and the cut strips it.
_CONTINUE_MARK = "<|lmstack:end-of-final-message|> "


def _mark_final_text(message: dict, field: str) -> None:
    """Append `_CONTINUE_MARK` to `message[field]` (a string, or the last text block of a list of
    content blocks); a reasoning field is marked under each name it is filed under."""
    value = message.get(field)
    if value is None:
        raise ValueError(f"continue_final_message: the final message has no {field!r} to continue")
    if isinstance(value, str):
        fields = [k for k in _REASONING_KEYS if message.get(k) == value] if field in _REASONING_KEYS else [field]
        for k in fields:
            message[k] = value + _CONTINUE_MARK
        return
    blocks = [b for b in value if isinstance(b, dict) and isinstance(b.get("text"), str)] if isinstance(value, list) else []
    if not blocks:
        raise ValueError(f"continue_final_message: the final message's {field!r} has no text to continue")
    blocks[-1]["text"] += _CONTINUE_MARK


def _cut_after_final_text(text: str) -> str:
    at = text.rfind(_CONTINUE_MARK.rstrip())
    if at < 0:
        raise ValueError("continue_final_message: the chat template does not write the final message's text, so "
                         "there is nothing to continue; check the template shows that message")
    kept = text.startswith(_CONTINUE_MARK, at)
    return text[:at] if kept else text[:at].rstrip()


def _conversation(messages) -> list[dict]:
    """Plain-data copy of the messages as transformers hands them to the template: keys whose
    value is None dropped (OpenAI-style `content=None`), reasoning filed under every name."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts with 'role' and 'content', "
                         f"got {type(messages).__name__} {_short(messages)}")
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"each message must be a dict with 'role' and 'content', got "
                             f"{type(message).__name__} {_short(message)}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value: Any) -> Any:
    """A copy built only of JSON-like types, so the sandbox never sees an object with methods it
    does not know are dangerous (tensors, images, str subclasses); dataclasses and pydantic models
    become dicts and anything else a "<TypeName>" placeholder, as in transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (str enums) lose their extra methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    """Compile once per template string; data pipelines render thousands of chats with one."""
    if _version(jinja2.__version__) < MIN_JINJA2:
        raise ImportError(f"chat templates need jinja2>={'.'.join(map(str, MIN_JINJA2))} (older "
                          f"sandboxes can be escaped); found {jinja2.__version__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_make_dict, namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template has a Jinja syntax error on line {e.lineno}: "
                         f"{first_line(e)}") from None


class _TemplateRaised(jinja2.TemplateError):
    """What `raise_exception(msg)` raises inside a template, told apart from rendering bugs."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' (wrong inside a prompt) and takes no options.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_dict(*args, **kwargs) -> dict:
    """`dict(...)` for templates without handing them the `dict` type itself."""
    return dict(*args, **kwargs)


_make_dict.fromkeys = dict.fromkeys


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore names, the way into Python internals."""

    def __init__(*args, **kwargs):  # Namespace's own trick, so namespace(self=1) still works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_public(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_public(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_public(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not set underscore attributes on a namespace, got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks in some
    templates (SmolLM3, OLMo); rendering keeps the body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
