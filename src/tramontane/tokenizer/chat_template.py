"""Jinja2 chat templates, rendered the way transformers' `apply_chat_template` renders them.

Same environment (sandboxed, `trim_blocks`, `lstrip_blocks`, loop controls), same helpers
(`raise_exception`, a `tojson` that does not escape HTML, `strftime_now`), same inputs (messages with
None-valued keys dropped, `tools`, `documents`, `add_generation_prompt` and the special token strings).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateRaised(ValueError):
    """A chat template called `raise_exception`: it rejects the conversation (e.g. roles not alternating)."""


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (used to mark assistant tokens) and renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template; raises `jinja2.TemplateSyntaxError` on a broken one."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat_template(
    template: jinja2.Template,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    special_tokens: Mapping[str, str],
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages`.

    Raises:
        ValueError: the template rejected the conversation (its `raise_exception`) or failed on it.
    """
    # transformers drops None-valued keys: templates test `'content' in message`, not `is none`.
    chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
        return template.render(
            messages=chat,
            tools=None if tools is None else [dict(t) for t in tools],
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except TemplateRaised as exc:
        raise ValueError(f"the chat template rejects this conversation: {exc}") from exc
    except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"the chat template failed on this conversation: {exc}") from exc
