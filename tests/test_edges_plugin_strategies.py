"""Strategy plugins through their entry-point groups, as an installed distribution declares them:
a decoding strategy is chosen by name, and a plugin of the wrong kind is a warning, not a crash."""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import pythonpath, run_process, tiny_llama

SOURCE = """
    import sys
    from llmctl.core.generate.search import sample_search

    def mine(model, job):
        print("strategy mine", file=sys.stderr)
        return sample_search(model, job)

    def plain_processor(scores, history):  # a function, not a Processor subclass
        return scores

    def plain_merge(inputs, weight: list[float]):  # a function, not a merge Method
        return inputs.others[0]

    import torch
    from llmctl.core.generate.sampling import Processor

    class Force(Processor):  # configured by `--plugin-arg force_token=N`, off without it
        order = 500

        def __init__(self, token):
            self.token = token

        @classmethod
        def from_config(cls, cfg):
            token = cfg.plugin_args.get("force_token")
            return None if token is None else cls(int(token))

        def __call__(self, scores, history):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.token] = 0.0
            return forced
"""
ENTRY_POINTS = """
    [llmctl.decoding_strategies]
    mine = strategy_plugin:mine

    [llmctl.logits_processors]
    plain = strategy_plugin:plain_processor
    force = strategy_plugin:Force

    [llmctl.merge_methods]
    plain = strategy_plugin:plain_merge
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "strategy_plugin.py").write_text(textwrap.dedent(SOURCE))
    info = site / "strategy-plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: strategy-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    return {"PYTHONPATH": pythonpath(site)}


def test_generate_runs_a_plugin_strategy_by_name_despite_a_wrong_processor_plugin(env, tmp_path):
    ck = tiny_llama(tmp_path, ["the cat sat on the mat"] * 10, vocab=280, context=32)
    r = run_process("generate", ck, "the cat", "-n", "2", "--strategy", "mine", env=env)
    assert r.code == 0, r.stderr
    assert "strategy mine" in r.stderr
    assert ("warning: logits processor plugin 'plain' (strategy_plugin:plain_processor) is not a Processor; "
            "ignored") in r.stderr
    bad = run_process("generate", ck, "the cat", "--strategy", "mien", env=env)
    assert bad.code == 2 and "unknown decoding strategy 'mien' (did you mean 'mine'?)" in bad.stderr


def test_merge_list_skips_a_plugin_that_is_not_a_method(env):
    r = run_process("merge", "--list", "--json", env=env)
    assert r.code == 0, r.stderr
    assert "merge method plugin 'plain' (strategy_plugin:plain_merge) is not a Method; ignored" in r.stderr
    assert "linear" in json.loads(r.stdout) and "plain" not in json.loads(r.stdout)


def test_a_plugin_processor_is_configured_by_plugin_args(env, tmp_path):
    ck = tiny_llama(tmp_path, ["the cat sat on the mat"] * 10, vocab=280, context=32)
    args = ["generate", ck, "the cat", "-n", "3", "--ignore-eos", "--json"]
    forced = run_process(*args, "--plugin-arg", "force_token=7", env=env)
    assert forced.code == 0, forced.stderr
    assert json.loads(forced.stdout)["tokens"] == [7, 7, 7]
    free = run_process(*args, env=env)
    assert free.code == 0 and json.loads(free.stdout)["tokens"] != [7, 7, 7]  # off without its setting
    bad = run_process(*args, "--plugin-arg", "force_token", env=env)
    assert bad.code == 2 and "'force_token' is not of the form key=value" in bad.stderr
