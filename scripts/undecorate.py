"""Apply each decorator after its function, so mutmut 3 mutates decorated functions.

mutmut 3 makes no mutants for a decorated function: registered strategies (`@SCHEDULES.register`),
`@torch.no_grad()` functions and the like are never mutated. Writing

    @d1(...)                      def f(...):
    @d2                    as         ...
    def f(...):                   f = d1(...)(d2(f))
        ...

is the same program (a decorator is called with what it decorates, in that order), so rewriting a
scratch copy this way puts those functions under mutation. Functions nested in functions are left
as they are, and so are `@overload` and property setters/deleters (which need the name's previous
binding). Only for a scratch copy made for mutation testing; never run it on the checkout.

    python scripts/undecorate.py llmctl/core/train/schedule.py ...   # rewrites the files in place
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

_KEEP = ("overload", ".setter", ".deleter")


def undecorate(source: str) -> str:
    """`source` with the decorators of its module- and class-level functions applied after them."""
    lines = source.splitlines(keepends=True)
    found: list[ast.FunctionDef | ast.AsyncFunctionDef] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.decorator_list:
                texts = [ast.get_source_segment(source, d) or "" for d in node.decorator_list]
                if not any(t.endswith(_KEEP) for t in texts):
                    found.append(node)

    visit(ast.parse(source).body)
    for node in sorted(found, key=lambda n: n.lineno, reverse=True):
        indent = " " * node.col_offset
        applied = node.name
        for decorator in reversed(node.decorator_list):
            applied = f"({ast.get_source_segment(source, decorator)})({applied})"
        lines.insert(node.end_lineno, f"{indent}{node.name} = {applied}\n")
        del lines[node.decorator_list[0].lineno - 1 : node.lineno - 1]
    return "".join(lines)


def main(paths: list[str]) -> None:
    for path in map(Path, paths):
        text = path.read_text(encoding="utf-8")
        path.write_text(undecorate(text), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
