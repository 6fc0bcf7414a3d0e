"""Round 10 edges: the registries every strategy goes through (`core/registry.py`)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

import llmctl.console
from llmctl.core.registry import Registry, did_you_mean
from llmctl.errors import UsageError


def test_register_get_and_name_of():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        pass

    a = object()
    assert reg.register("a")(a) is a  # the decorator returns what it registers
    assert reg.register("a")(a) is a  # the same item again is harmless
    assert reg.get("a") is a and reg.get("b") is b
    assert reg.name_of(b) == "b" and reg.name_of(a) == "a"
    assert reg.names() == ["a", "b"] and reg.items() == [("a", a), ("b", b)]
    assert "a" in reg and "c" not in reg and ["a"] not in reg and None not in reg
    with pytest.raises(ValueError, match="^widget 'a' is registered twice$"):
        reg.register("a")(object())
    with pytest.raises(KeyError, match="is not a registered widget"):
        reg.name_of(object())


def test_an_unknown_name_suggests_the_closest_and_lists_the_choices():
    reg = Registry("LR schedule")
    for name in ("cosine", "linear", "constant"):
        reg.register(name)(name)
    with pytest.raises(UsageError) as e:
        reg.get("cosin")
    assert str(e.value) == "unknown LR schedule 'cosin' (did you mean 'cosine'?); choose from: constant, cosine, linear"
    with pytest.raises(UsageError) as e:
        reg.get("zzz")
    assert str(e.value) == "unknown LR schedule 'zzz'; choose from: constant, cosine, linear"
    with pytest.raises(UsageError, match=r"^unknown LR schedule '\['cosine'\]'"):
        reg.get(["cosine"])  # a list where a name belongs (unhashable)
    assert did_you_mean(12, [11, 120]) == " (did you mean '120'?)"  # names compared as strings
    assert did_you_mean("abc", ["xyz"]) == ""
    assert did_you_mean("abcd", ["abxy"]) == " (did you mean 'abxy'?)"  # similarity 0.5 is close enough


def _entry_point(name, value, loaded=None, error=None):
    def load():
        if error:
            raise error
        return loaded
    return SimpleNamespace(name=name, value=value, load=load)


def test_plugins_and_builtin_modules_load_once_on_first_use(monkeypatch, tmp_path):
    """Entry points of the group are loaded on the first query (not at import), after the
    built-in modules; one may not replace a built-in, and a broken one is a warning."""
    reg = Registry("kernel", entry_point_group="test.kernels", modules=("_llmctl_test_builtins",))
    (tmp_path / "_llmctl_test_builtins.py").write_text(
        "import sys\nsys.modules['_llmctl_registry_under_test'].register('builtin')('B')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "_llmctl_registry_under_test", reg)
    monkeypatch.delitem(sys.modules, "_llmctl_test_builtins", raising=False)
    groups = []
    points = [_entry_point("fast", "pkg:fast", loaded="F"), _entry_point("builtin", "pkg:evil", loaded="E"),
              _entry_point("broken", "pkg:broken", error=ImportError("no module named pkg"))]

    def entry_points(group):
        groups.append(group)
        return points

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    warnings = []
    monkeypatch.setattr(llmctl.console, "warn", warnings.append)
    assert not groups and "_llmctl_test_builtins" not in sys.modules  # nothing at construction
    assert reg.names() == ["builtin", "fast"]
    assert reg.get("fast") == "F" and reg.get("builtin") == "B" and "broken" not in reg
    assert groups == ["test.kernels"] and "_llmctl_test_builtins" in sys.modules  # once
    assert warnings == ["plugin pkg:evil may not replace built-in kernel 'builtin'; ignored",
                        "kernel plugin 'broken' (pkg:broken) failed to load: no module named pkg"]


@pytest.mark.parametrize("query", ["get", "name_of", "items", "names", "contains"])
def test_every_query_loads_the_plugins_first(monkeypatch, query):
    reg = Registry("kernel", entry_point_group="test.kernels")
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [_entry_point("p", "pkg:p", loaded="P")])
    result = {"get": lambda: reg.get("p"), "name_of": lambda: reg.name_of("P"), "items": reg.items,
              "names": reg.names, "contains": lambda: "p" in reg}[query]()
    assert result in ("P", "p", [("p", "P")], ["p"], True)


def test_a_registry_without_plugins_never_looks_for_them(monkeypatch):
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: pytest.fail("looked for plugins"))
    reg = Registry("thing")
    reg.register("x")(1)
    assert reg.get("x") == 1 and reg.names() == ["x"]
    only_modules = Registry("thing", modules=())
    assert only_modules.names() == []
    group_only = Registry("thing", entry_point_group=None, modules=("_llmctl_missing_module",))
    with pytest.raises(ModuleNotFoundError):
        group_only.names()  # a built-in module is imported, not guarded like a plugin


def test_the_silent_reporter_takes_every_call_and_prints_nothing(capsys):
    """`core/report.py`: library code reports through `SILENT` by default."""
    from llmctl.core.report import SILENT

    with SILENT.progress("train", total=3, unit="step") as bar:
        bar.advance()
        bar.advance(2)
        bar.update(total=4, completed=3, loss=0.5)
    SILENT.info("resuming")
    SILENT.warn("careful")
    assert capsys.readouterr() == ("", "")


def test_the_adapters_package_resolves_its_names_lazily():
    """`core/adapters/__init__.py`: each public name comes from its module on first use."""
    import importlib

    import llmctl.core.adapters as adapters

    for name in adapters.__all__:
        home = importlib.import_module(f"llmctl.core.adapters.{adapters._HOMES[name]}")
        assert getattr(adapters, name) is getattr(home, name), name
    assert adapters.__all__ == sorted(adapters._HOMES) and "LoRA" in adapters.__all__
    with pytest.raises(AttributeError) as e:
        adapters.nope
    assert str(e.value) == "module 'llmctl.core.adapters' has no attribute 'nope'"


def test_exporters_are_registered_strategies():
    """`core/export/__init__.py`: the built-in GGUF exporter is registered; the base class
    declares the interface only."""
    from llmctl.core.export import EXPORTERS, Exporter
    from llmctl.core.export.gguf import GGUFExporter

    assert EXPORTERS.get("gguf") is GGUFExporter and issubclass(GGUFExporter, Exporter)
    assert (Exporter.types, Exporter.kind) == ((), "")
    with pytest.raises(NotImplementedError):
        Exporter().export("ck", "out", type="f32")


def test_a_plugin_that_is_not_of_the_registry_base_is_a_warning(monkeypatch):
    """`base=`: a plugin must be an instance or a subclass of it; anything else is skipped."""
    class Base:
        pass

    class Good(Base):
        pass

    reg = Registry("widget", entry_point_group="test.widgets", base=Base)
    points = [_entry_point("cls", "pkg:Good", loaded=Good), _entry_point("obj", "pkg:obj", loaded=Good()),
              _entry_point("fn", "pkg:fn", loaded=len)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: points)
    warnings = []
    monkeypatch.setattr(llmctl.console, "warn", warnings.append)
    assert reg.names() == ["cls", "obj"]
    assert warnings == ["widget plugin 'fn' (pkg:fn) is not a Base; ignored"]


@pytest.mark.parametrize("module, name, base", [
    ("llmctl.core.prune", "PRUNERS", "Pruner"), ("llmctl.core.export", "EXPORTERS", "Exporter"),
    ("llmctl.core.train.objectives", "OBJECTIVES", "Objective"), ("llmctl.core.quant.methods", "QUANTIZERS", "Method"),
    ("llmctl.core.evaluate.tasks", "TASK_TYPES", "Task"), ("llmctl.core.generate.sampling", "PROCESSORS", "Processor"),
    ("llmctl.core.merge.methods", "METHODS", "Method"), ("llmctl.core.model.transforms", "TRANSFORMS", "Transform"),
])
def test_every_class_based_registry_names_its_base(module, name, base):
    """A plugin of the wrong kind is a warning, not an AttributeError when it is chosen (or, for
    registries every command consults, in every command)."""
    import importlib

    registry = getattr(importlib.import_module(module), name)
    assert registry.base is not None and registry.base.__name__ == base
    assert all(isinstance(item, registry.base) or issubclass(item, registry.base)
               for item in map(registry.get, registry.names()))  # the built-ins are of that kind
