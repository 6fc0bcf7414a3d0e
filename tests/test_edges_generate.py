"""Edges of the decoding code that the end-to-end comparisons do not reach (found by mutation
testing, docs/testing.md): contrastive search's hidden states on every norm placement, and
rolling a padded batch's cache back."""

from __future__ import annotations

import functools

import pytest
import torch

from llmctl.core.generate.search import Runner
from llmctl.core.model import ModelConfig, Transformer

TINY = dict(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=48,
            max_seq_len=64)


def make(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("placement", [dict(), dict(norm_placement="post", norm="layernorm")])
def test_contrastive_hidden_states_are_what_the_head_reads(placement):
    """Contrastive search compares the last hidden states: the head's input after any final norm,
    the same from the prefill, an eager forward and `decode_step(hidden=True)`."""
    model = make(**placement)
    prompts, token = torch.randint(0, 97, (2, 7)).tolist(), torch.tensor([[3], [4]])
    eager, stepped = (Runner(model, prompts, 32, torch.device("cpu"), hidden=True) for _ in range(2))
    stepped.step_fn = functools.partial(model.decode_step, hidden=True)  # what --compile compiles
    with torch.no_grad():
        logits = eager.prefill(keep=0)
        assert eager.hidden.shape == (2, 7, 32)
        assert torch.allclose(model.lm_head(eager.hidden).float(), logits, atol=1e-5)
        stepped.prefill()
        logits, step_logits = eager.forward(token), stepped.forward(token)
    assert eager.hidden.shape == stepped.hidden.shape == (2, 1, 32)
    assert torch.allclose(model.lm_head(eager.hidden).float(), logits, atol=1e-5)
    assert torch.allclose(stepped.hidden, eager.hidden, atol=1e-5) and torch.allclose(step_logits, logits, atol=1e-5)


def test_a_runner_that_keeps_hidden_states_never_takes_the_native_plan():
    """The native plan returns logits only: one CPU row that must keep its hidden states steps in Python."""
    from llmctl.core.native.decode import native_step

    model = make(intermediate_size=64)  # widths the native kernels take (multiples of 32)
    plain, keeping = (Runner(model, [[5, 6, 7]], 32, torch.device("cpu"), hidden=h) for h in (False, True))
    assert keeping.step_fn is None and (plain.step_fn is not None) == (native_step(model) is not None)
    with torch.no_grad():
        keeping.prefill()
        logits = keeping.forward(torch.tensor([[3]]))
    assert torch.allclose(model.lm_head(keeping.hidden).float(), logits, atol=1e-5)


def test_truncating_a_padded_batch_rewinds_its_positions():
    """Rolling back n cached tokens of a left-padded batch, then feeding others, equals a run
    that was fed those tokens in the first place."""
    model = make()
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    kept, dropped, fresh = torch.tensor([[1], [2]]), torch.tensor([[3, 4], [5, 6]]), torch.tensor([[7, 8], [9, 10]])
    with torch.no_grad():
        rolled = Runner(model, prompts, 32, torch.device("cpu"))
        rolled.prefill()
        rolled.forward(kept)
        rolled.forward(dropped)
        rolled.truncate(rolled.length - 2)
        got = rolled.forward(fresh)
        straight = Runner(model, prompts, 32, torch.device("cpu"))
        straight.prefill()
        straight.forward(kept)
        want = straight.forward(fresh)
    assert rolled.padded
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("file, flags, want", [
    ({"do_sample": True}, {}, (1.0, 50, 1.0, 1.0)),  # transformers' GenerationConfig defaults for absent keys
    ({"do_sample": True, "top_k": None, "temperature": 0.7}, {}, (0.7, 0, 1.0, 1.0)),  # null: no top-k
    ({"do_sample": True, "top_k": 0, "repetition_penalty": 1.3}, {}, (1.0, 0, 1.0, 1.3)),
    ({"repetition_penalty": 1.3}, {}, (0.0, 0, 1.0, 1.3)),  # applied to greedy decoding too, as transformers does
    ({"do_sample": True, "repetition_penalty": 1.3}, {"top_k": 5, "repetition_penalty": 1.0}, (1.0, 5, 1.0, 1.0)),
    # flags win key by key: a given temperature keeps the file's top_k/top_p, as transformers' generate() does
    ({"do_sample": True, "top_k": 7, "top_p": 0.9, "temperature": 0.3}, {"temperature": 0.8}, (0.8, 7, 0.9, 1.0)),
    ({"do_sample": True, "top_k": 7, "top_p": 0.9}, {"temperature": 0.8, "top_k": 2}, (0.8, 2, 0.9, 1.0)),
    ({"do_sample": True, "top_k": 7, "top_p": 0.9}, {"temperature": 0.0}, (0.0, 0, 1.0, 1.0)),  # 0: greedy
    ({"top_k": 7, "top_p": 0.9}, {"temperature": 0.8}, (0.8, 0, 1.0, 1.0)),  # not a sampling file: ours
])
def test_generation_config_json_means_what_it_means_to_transformers(tmp_path, file, flags, want):
    """A key generation_config.json lacks takes transformers' default (top_k 50 when sampling); its
    repetition_penalty is honoured; the command's flags win over the file, key by key."""
    import json

    from llmctl.commands.generate import _apply_checkpoint_defaults
    from llmctl.core.generate import GenerationConfig

    (tmp_path / "generation_config.json").write_text(json.dumps(file))
    cfg = GenerationConfig(temperature=flags.get("temperature", 0.0), top_k=flags.get("top_k", 0),
                           repetition_penalty=flags.get("repetition_penalty", 1.0))

    class Tok:
        stop_ids = [1]

    _apply_checkpoint_defaults(cfg, tmp_path, Tok(), flags.get("temperature"), flags.get("top_k"), None, None, False,
                               flags.get("repetition_penalty"))
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == want


@pytest.mark.parametrize("file", [{"do_sample": True, "top_k": "many"}, {"repetition_penalty": 0},
                                  {"do_sample": True, "top_p": 2}, {"repetition_penalty": True}])
def test_a_bad_generation_config_json_value_is_one_checkpoint_error(tmp_path, file):
    """A value transformers would refuse is a CheckpointError naming the file and the key, not a raw
    ValueError (or a repetition penalty of 0 that divides by zero)."""
    import json

    from llmctl.commands.generate import _apply_checkpoint_defaults
    from llmctl.core.generate import GenerationConfig
    from llmctl.errors import CheckpointError

    (tmp_path / "generation_config.json").write_text(json.dumps(file))

    class Tok:
        stop_ids = [1]

    key = next(k for k in file if k != "do_sample")
    with pytest.raises(CheckpointError, match=rf"generation_config.json: '{key}' is .*, not a valid {key}$"):
        _apply_checkpoint_defaults(GenerationConfig(), tmp_path, Tok(), None, None, None, None, False, None)


def test_a_generation_config_json_that_is_not_an_object_is_ignored(tmp_path):
    from llmctl.commands.generate import _apply_checkpoint_defaults
    from llmctl.core.generate import GenerationConfig

    (tmp_path / "generation_config.json").write_text("[1, 2]")

    class Tok:
        stop_ids = [1]

    cfg = GenerationConfig()
    _apply_checkpoint_defaults(cfg, tmp_path, Tok(), None, None, None, None, False, None)
    assert (cfg.temperature, cfg.top_k, cfg.repetition_penalty, cfg.eos_ids) == (0.0, 0, 1.0, [1])
