"""scripts/undecorate.py (mutation testing's rewrite): the same program with each decorator applied
after its function, so mutmut 3 mutates decorated functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SOURCE = '''
REGISTRY, CALLS = {}, []


def register(name):
    def add(f):
        REGISTRY[name] = f
        return f
    return add


def traced(f):
    def wrapper(*args):
        CALLS.append(f.__name__)
        return f(*args)
    wrapper.__name__ = f.__name__
    return wrapper


@register(
    "double")  # a decorator over two lines
@traced
def double(x):
    return 2 * x


class Box:
    def __init__(self, value):
        self._value = value

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, new):
        self._value = new

    @staticmethod
    def make(value):
        @traced
        def inner():
            return Box(value)
        return inner()
'''


def _load(source: str, name: str, tmp_path: Path):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decorators_are_applied_after_their_functions_with_the_same_result(tmp_path):
    spec = importlib.util.spec_from_file_location("undecorate", Path(__file__).parents[1] / "scripts" / "undecorate.py")
    undecorate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(undecorate)

    rewritten = undecorate.undecorate(SOURCE)
    assert "double = (register(\n    \"double\"))((traced)(double))" in rewritten
    assert "    value = (property)(value)" in rewritten and "    @value.setter" in rewritten  # setters kept
    assert "        @traced\n        def inner" in rewritten  # nested functions kept
    assert "    make = (staticmethod)(make)" in rewritten
    for module in (_load(SOURCE, "before", tmp_path), _load(rewritten, "after", tmp_path)):
        assert module.REGISTRY["double"](4) == 8 and module.CALLS == ["double"]
        box = module.Box.make(3)
        box.value = 5
        assert box.value == 5 and module.CALLS == ["double", "inner"]
