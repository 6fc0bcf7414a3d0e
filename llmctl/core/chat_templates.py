"""Chat templates: built-in named Jinja templates and a renderer matching transformers'.

A template is stored as Jinja source in `tokenizer_config.json["chat_template"]`, the place
transformers reads it from. `render_chat` renders it in the same sandboxed environment and
with the same variables as `transformers`' `apply_chat_template`, so both give identical text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmctl.core.registry import Registry
from llmctl.errors import UsageError


@dataclass(frozen=True)
class ChatTemplate:
    """A named template: its Jinja source, the special tokens it needs and its end-of-turn token."""

    name: str
    source: str
    tokens: tuple[str, ...]
    end_of_turn: str


CHAT_TEMPLATES: Registry[ChatTemplate] = Registry("chat template")


def _builtin(template: ChatTemplate) -> ChatTemplate:
    return CHAT_TEMPLATES.register(template.name)(template)


CHATML = _builtin(ChatTemplate(
    name="chatml",
    source=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    tokens=("<|im_start|>", "<|im_end|>"),
    end_of_turn="<|im_end|>",
))

LLAMA3 = _builtin(ChatTemplate(
    name="llama3",
    source=(
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    end_of_turn="<|eot_id|>",
))


def resolve_template(name_or_file: str) -> tuple[str, tuple[str, ...]]:
    """A built-in name or a `.jinja` file → (Jinja source, special tokens it needs)."""
    path = Path(name_or_file)
    if name_or_file not in CHAT_TEMPLATES and (path.suffix in (".jinja", ".j2") or path.exists()):
        return _template_file(path), ()
    template = CHAT_TEMPLATES.get(name_or_file)
    return template.source, template.tokens


MAX_TEMPLATE_BYTES = 1 << 20


def _template_file(path: Path) -> str:
    """The source of a chat-template file; UsageError unless it looks like one (UTF-8 Jinja that
    loops over `messages`, under 1 MiB) and compiles."""
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise UsageError(f"chat template {path}: over {MAX_TEMPLATE_BYTES >> 20} MiB, not a chat template")
        source = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UsageError(f"chat template {path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"chat template {path}: not UTF-8 text, so not a Jinja chat template") from None
    if "messages" not in source or not ("{{" in source or "{%" in source):
        raise UsageError(f"chat template {path}: not a Jinja chat template (it never uses 'messages'); "
                         f"give a .jinja file or one of: {', '.join(CHAT_TEMPLATES.names())}")
    compile_template(source)  # fail now on a syntax error, not at generation time
    return source


def end_of_turn_tokens() -> set[str]:
    """End-of-turn tokens of every built-in template (stop tokens for chat generation)."""
    return {CHAT_TEMPLATES.get(name).end_of_turn for name in CHAT_TEMPLATES.names()}


@lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile like transformers: sandboxed, trim/lstrip blocks, loopcontrols, `{% generation %}`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}…{% endgeneration %}` renders its body (assistant-mask marker)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise UsageError(f"chat template: Jinja syntax error on line {exc.lineno}: {exc.message}") from None


def render_chat(
    source: str,
    messages: list[dict[str, Any]],
    special_tokens: dict[str, str],
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render `messages` as transformers' `apply_chat_template(..., tokenize=False)` does.

    `special_tokens` maps `bos_token`, `eos_token`, … to their strings (templates may use them);
    messages' keys whose value is None are dropped, as transformers does.
    """
    import jinja2

    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_template(source).render(
            messages=messages, tools=kwargs.pop("tools", None), documents=kwargs.pop("documents", None),
            add_generation_prompt=add_generation_prompt, **{**special_tokens, **kwargs},
        )
    except jinja2.exceptions.TemplateError as exc:
        raise UsageError(f"chat template: {exc}") from None
