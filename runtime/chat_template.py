"""Renders a chat with a model's Jinja chat template, the way transformers' apply_chat_template does.

Chat templates ship inside model files, so they are untrusted code: they run in jinja2's
immutable sandbox. The environment matches transformers' (trim_blocks, lstrip_blocks, a
`tojson` that does not HTML-escape, `raise_exception`, `strftime_now`, loop controls and the
`{% generation %}` tag), so a template renders here exactly as it does there.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidRequestError

# Used when a model has no template of its own. ChatML is the most common format for chat
# models, and a model that was not tuned for any format is no worse off with it than with
# another; its <|im_start|>/<|im_end|> markers are plain text where the vocabulary lacks them.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

def render_chat(template: str | None, messages: Sequence[dict[str, Any]], *, bos_token: str | None,
                eos_token: str | None, add_generation_prompt: bool = True, **extra: Any) -> str:
    """Renders `messages` ([{"role": str, "content": str}, ...]) with `template` (ChatML if None).

    `extra` becomes template variables (e.g. tools=[...]); `tools` and `documents` default to None
    as in transformers. Bad messages or a template that fails raise InvalidRequestError.
    """
    checked = validate_messages(messages)
    compiled = _compile(template if template is not None else CHATML_TEMPLATE)
    variables = {"tools": None, "documents": None, **extra}
    # An unset special token stays undefined, which a template renders as "".
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    try:
        return compiled.render(messages=checked, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"the model's chat template rejected this conversation: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        # Python operations inside the template (e.g. str + None) fail with these.
        raise InvalidRequestError(
            f"the model's chat template failed on this conversation: {type(exc).__name__}: {exc}"
        ) from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Checks messages are a non-empty list of {"role": str, "content": str}; returns plain copies."""
    if not isinstance(messages, (list, tuple)):
        raise InvalidRequestError(f"messages must be a list of {{'role', 'content'}} objects, "
                                  f"got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("messages must not be empty")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content', "
                                      f"got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"messages[{i}].role must be a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        checked.append(dict(message))
    return checked


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as exc:  # TemplateSyntaxError
        raise InvalidRequestError(f"the model's chat template does not parse: {exc}") from None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
