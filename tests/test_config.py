"""Config system: YAML + presets + dotted overrides → typed dataclasses, with precise errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from llmctl.config import load_config, parse_override
from llmctl.errors import ConfigError


@dataclass
class Dist:
    strategy: Literal["ddp", "fsdp"] = "ddp"
    buckets: int = 25


@dataclass
class Schema:
    lr: float = 1e-3
    max_steps: int = 10
    name: str = "run"
    compile: bool = False
    data: list[str] = field(default_factory=list)
    warmup: Optional[int] = None
    distributed: Dist = field(default_factory=Dist)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 0.01\nmax_steps: 100\ndistributed:\n  strategy: fsdp\ndata: [a.txt, b.txt]\n")
    return path


def test_yaml_and_overrides(recipe):
    cfg = load_config(Schema, str(recipe), ["lr=3e-4", "distributed.buckets=4", "compile=true", "warmup=null", "name=7"])
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.max_steps == 100
    assert cfg.distributed == Dist("fsdp", 4)
    assert cfg.compile is True and cfg.warmup is None and cfg.name == "7"
    assert cfg.data == ["a.txt", "b.txt"]


def test_scalar_coercions():
    cfg = load_config(Schema, None, ["max_steps=1e3", "lr=2", "data=one.txt", "compile=off"])
    assert cfg.max_steps == 1000 and cfg.lr == 2.0 and cfg.data == ["one.txt"] and cfg.compile is False


def test_unknown_key_suggests(recipe):
    with pytest.raises(ConfigError, match=r"unknown config key 'max_step' \(did you mean 'max_steps'\?\)"):
        load_config(Schema, str(recipe), ["max_step=3"])
    with pytest.raises(ConfigError, match=r"'distributed.strategi'.*did you mean 'strategy'"):
        load_config(Schema, None, ["distributed.strategi=ddp"])


def test_unknown_key_in_file_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 0.1\n\nmax_stepz: 5\n")
    with pytest.raises(ConfigError, match=rf"'max_stepz'.*{path}:3"):
        load_config(Schema, str(path))


def test_wrong_type_names_key_type_and_origin(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 0.1\nmax_steps: lots\n")
    with pytest.raises(ConfigError) as err:
        load_config(Schema, str(path))
    assert "'max_steps': expected int, got 'lots'" in str(err.value) and f"{path}:2" in str(err.value)
    with pytest.raises(ConfigError, match=r"'lr': expected float, got 'fast' \(from override 'lr=fast'\)"):
        load_config(Schema, None, ["lr=fast"])
    with pytest.raises(ConfigError, match=r"'distributed.strategy': expected 'ddp' \| 'fsdp', got 'fsdb'.*did you mean 'fsdp'"):
        load_config(Schema, None, ["distributed.strategy=fsdb"])
    with pytest.raises(ConfigError, match="expected bool"):
        load_config(Schema, None, ["compile=maybe"])


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(Schema, str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(Schema, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("lr")


def test_unknown_preset_suggests(tmp_path, monkeypatch):
    import llmctl.config as config

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "tiny.yaml").write_text("lr: 1\n")
    monkeypatch.setattr(config, "configs_dir", lambda: tmp_path)
    assert load_config(Schema, "tiny", kind="train").lr == 1.0
    with pytest.raises(ConfigError, match=r"unknown train preset 'tinny' \(did you mean 'tiny'\?\)"):
        load_config(Schema, "tinny", kind="train")


def test_config_show_cli(llmctl, recipe):
    r = llmctl("config", "show", recipe, "lr=0.5", "extra.key=3", "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout) == {"lr": 0.5, "max_steps": 100, "distributed": {"strategy": "fsdp"},
                                    "data": ["a.txt", "b.txt"], "extra": {"key": 3}}
    r = llmctl("config", "show", recipe)
    assert r.code == 0 and "max_steps: 100" in r.stdout
    bad = llmctl("config", "show", "no-such-preset")
    assert bad.code == 2 and "unknown preset 'no-such-preset'" in bad.stderr


def test_config_show_validates_shipped_presets(llmctl):
    r = llmctl("config", "show", "model/nano", "num_layers=3", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["num_layers"] == 3 and r.json()["hidden_size"] == 64
    assert llmctl("config", "show", "train/tiny", "lr=1e-3", "--json").json()["lr"] == 1e-3
    bad = llmctl("config", "show", "model/nano", "num_layer=3")
    assert bad.code == 2 and "did you mean 'num_layers'" in bad.stderr
