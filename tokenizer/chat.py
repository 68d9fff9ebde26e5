"""Chat templates: a checkpoint's Jinja2 template (tokenizer_config.json
`chat_template`, or `tokenizer.chat_template` in a GGUF file's metadata)
rendered over a list of {"role", "content"} messages.

In a request's life: a chat request reaches the router (gRPC `Chat` prompt, or
the HTTP /v1/chat/completions front), the messages are rendered here into one
prompt string with the generation prompt appended, and that string is then
tokenized without adding special tokens again (the template writes them).

The template comes with the checkpoint, the messages come from the client, so
both are bounded: the template runs in Jinja2's immutable sandbox (no access to
Python internals, no mutation of the messages), loops are capped by the
sandbox's range limit, `*`/`+`/`**` by the size of what they would build, and
the rendered text by `max_chars`; the messages' count and size are bounded by
the request size limit of the front that received them. What remains (a
template the operator chose that loops long within those bounds) costs time,
which is why the router renders large chats off its event loop. The environment
mirrors what Hugging Face templates are written against (trim_blocks,
lstrip_blocks, `raise_exception`, a `tojson` that does not HTML-escape, the
loop controls and the `{% generation %}` tag), so a rendering equals
transformers' `apply_chat_template`.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime

MAX_RENDERED_CHARS = 64 * 1024 * 1024
"""Upper bound on a rendered prompt: four times the router's 16 MiB request limit."""


class ChatTemplateError(ValueError):
    """The chat cannot be rendered: no template, a template that raised, or bad messages."""


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes <, >, & and ' for HTML; prompts need the plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _generation_extension():
    """`{% generation %}...{% endgeneration %}` marks the assistant's part for
    training masks; for serving it renders its body unchanged."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation


@functools.lru_cache(maxsize=1)
def _sandbox_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def _size(x) -> int:
        return len(x) if isinstance(x, (str, list, tuple)) else 0

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, plus: `*`, `**` and `+` refuse to build a value
        past MAX_RENDERED_CHARS (`'x' * 10**9` would allocate before the output bound sees it)."""

        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "*" and (isinstance(left, int) or isinstance(right, int)):
                count = right if isinstance(right, int) else left
                if max(_size(left), _size(right), 1) * max(count, 0) > MAX_RENDERED_CHARS:
                    raise SecurityError("template: value too large")
            elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
                raise SecurityError("template: exponent too large")
            elif operator == "+" and _size(left) + _size(right) > MAX_RENDERED_CHARS:
                raise SecurityError("template: value too large")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    """The sandboxed, compiled template (cached: a router renders the same one for every request)."""
    import jinja2

    env = _sandbox_class()(
        trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _generation_extension()],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None


def check_messages(messages) -> list[dict]:
    """Messages as plain dicts with string role and content (what templates index)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("chat: messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"chat: message {i} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"chat: message {i} has no role")
        if not isinstance(content, str):
            raise ChatTemplateError(f"chat: message {i} content must be a string")
        out.append(dict(m))
    return out


def render_chat(source: str | None, messages, *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str] | None = None, max_chars: int = MAX_RENDERED_CHARS,
                **extra) -> str:
    """`messages` rendered with the template `source`; ChatTemplateError saying why when it cannot be."""
    import jinja2

    if not source:
        raise ChatTemplateError("the model has no chat template; send the prompt as text or token ids")
    template = compile_template(source)
    context = dict(special_tokens or {})
    context.update(extra, messages=check_messages(messages), add_generation_prompt=bool(add_generation_prompt))
    parts, size = [], 0
    try:
        # streamed, so that a template multiplying its input stops at max_chars, not at memory's end
        for piece in template.generate(**context):
            size += len(piece)
            if size > max_chars:
                raise ChatTemplateError(f"the rendered chat exceeds {max_chars} characters")
            parts.append(piece)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from None
    except ChatTemplateError:
        raise
    except Exception as e:  # a template indexing what the messages lack, dividing by zero, ...
        raise ChatTemplateError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
    return "".join(parts)
