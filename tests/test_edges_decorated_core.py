"""Decorated functions of the model, quant, merge, generate and prune modules (properties,
class- and staticmethods, context managers), which mutmut 3 mutates only after
`scripts/undecorate.py`: checked against transformers and hand-worked values (round 11)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from transformers.generation.utils import GenerationMixin  # noqa: E402

from llmctl.core.model import Transformer  # noqa: E402
from llmctl.core.model.cache import KVCache  # noqa: E402


def test_a_same_size_reorder_permutes_the_cache_in_place_and_a_smaller_one_shrinks_it():
    """Beam search reorders the cache; a captured CUDA graph needs the same tensors kept."""
    cache = KVCache(2, 3, 2, 4, 5)  # batch 3, two heads: the batch is the keys' first axis
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        k.copy_(torch.arange(3.0).view(3, 1, 1, 1) + 10 * i)
        v.copy_(-torch.arange(3.0).view(3, 1, 1, 1) - 10 * i)
    assert cache.batch_size == 3
    storage = [t.data_ptr() for t in (*cache.keys, *cache.values)]
    cache.reorder(torch.tensor([2, 0, 0]))
    assert [t.data_ptr() for t in (*cache.keys, *cache.values)] == storage
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        assert k[:, 0, 0, 0].tolist() == [2 + 10 * i, 10 * i, 10 * i]
        assert v[:, 0, 0, 0].tolist() == [-2 - 10 * i, -10 * i, -10 * i]
    cache.reorder(torch.tensor([0, 2]))
    assert cache.batch_size == 2 and [k.shape for k in cache.keys] == [(2, 2, 4, 5)] * 2
    assert cache.keys[1][:, 0, 0, 0].tolist() == [12, 10]


def test_positions_from_a_left_padded_mask_are_transformers_generation_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = GenerationMixin._prepare_position_ids_for_generation(None, torch.zeros(3, 5, dtype=torch.long),
                                                                     {"attention_mask": mask})
    got = Transformer._positions(mask, 3, 5, torch.device("cpu"))
    assert got.dtype == torch.long and torch.equal(got, expected)
    bool_mask = Transformer._positions(mask.bool(), 3, 5, torch.device("cpu"))
    assert torch.equal(bool_mask, expected)
    unpadded = GenerationMixin._prepare_position_ids_for_generation(None, torch.zeros(2, 4, dtype=torch.long), {})
    assert torch.equal(Transformer._positions(None, 2, 4, torch.device("cpu")), unpadded.expand(2, 4))
    on_meta = Transformer._positions(None, 2, 4, torch.device("meta"))  # made on the inputs' device
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 4)


def test_a_vocabulary_is_the_identity_only_when_every_input_row_already_is_the_output_row():
    from llmctl.core.merge.recipe import TokenSource
    from llmctl.core.merge.vocab import Vocabulary

    def vocab(size=3, rows=None, sizes=None, tokens=None):
        rows = rows or {"a": [0, 1, 2], "b": [0, 1, 2]}
        return Vocabulary(tok=None, size=size, order=["x", "y", "z"], rows=rows, vocabs={},
                          sizes=sizes or {"a": 3, "b": 3}, tokens=tokens or {}, base="a")

    assert vocab().identity
    assert vocab(tokens={"y": TokenSource("b")}).identity  # an entry that only fills rows a model lacks
    assert not vocab(tokens={"y": TokenSource("b", force=True)}).identity  # forced: b's row replaces a's
    assert not vocab(size=4).identity  # padded to a multiple: one more row
    assert not vocab(rows={"a": [0, 1, 2], "b": [1, 0, 2]}).identity  # b's tokens in another order
    assert not vocab(rows={"a": [0, 1, 2], "b": [0, 1, -1]}).identity  # b lacks z
    assert not vocab(sizes={"a": 3, "b": 4}).identity  # b's embedding has a row past the vocabulary
    assert not vocab(sizes={"a": 2, "b": 3}).identity


def test_a_methods_inputs_list_the_base_first_then_the_others():
    from llmctl.core.merge.methods import Inputs, Param

    base, one, two = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    assert [t[0].item() for t in Inputs(base, [one, two]).all] == [0, 1, 2]
    assert [t[0].item() for t in Inputs(None, [one, two]).all] == [1, 2]
    assert Param("t", float).required and not Param("t", float, default=None).required
    assert not Param("normalize", bool, default=True).required


def test_awq_swaps_in_trial_weights_in_the_linears_dtype_and_restores_their_own_even_on_error():
    from llmctl.core.quant.awq import _swapped

    g = torch.Generator().manual_seed(0)
    a, b = torch.nn.Linear(4, 3).to(torch.bfloat16), torch.nn.Linear(4, 2).to(torch.bfloat16)
    own = [a.weight.data_ptr(), b.weight.data_ptr()]
    values = [a.weight.detach().clone(), b.weight.detach().clone()]
    trial = [torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g)]  # float32 trial weights
    with _swapped([a, b], trial):
        for m, w in zip((a, b), trial):
            assert m.weight.dtype == torch.bfloat16 and torch.equal(m.weight, w.to(torch.bfloat16))
    assert [a.weight.data_ptr(), b.weight.data_ptr()] == own
    assert torch.equal(a.weight, values[0]) and torch.equal(b.weight, values[1])
    with pytest.raises(ValueError, match="^inside$"), _swapped([a, b], trial):
        raise ValueError("inside")
    assert [a.weight.data_ptr(), b.weight.data_ptr()] == own
    assert torch.equal(a.weight, values[0]) and torch.equal(b.weight, values[1])


def test_capture_inputs_calls_back_with_each_paths_input_for_the_kind_asked_and_then_unhooks():
    from torch import nn

    from llmctl.core.model.layerwise import capture_inputs

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 3), nn.ReLU()))
    x = torch.randn(2, 4)
    hidden = net[0](x)
    calls = []
    with torch.no_grad(), capture_inputs(net, lambda path, t: calls.append((path, t))) as seen:
        net(x)
    assert [p for p, _ in calls] == ["0", "2.0"] and seen == {}
    assert torch.equal(calls[0][1], x) and torch.equal(calls[1][1], net[1](hidden))
    relus = []
    with torch.no_grad(), capture_inputs(net, lambda path, t: relus.append((path, t)), kind=nn.ReLU):
        net(x)
    assert [p for p, _ in relus] == ["1", "2.1"] and torch.equal(relus[0][1], hidden)
    with pytest.raises(RuntimeError, match="^stop$"), capture_inputs(net) as seen:
        net(x)
        net(x[:1])
        raise RuntimeError("stop")
    assert sorted(seen) == ["0", "2.0"] and [t.shape[0] for t in seen["0"]] == [2, 1]
    assert not seen["0"][0].requires_grad and torch.equal(seen["0"][1], x[:1])
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_the_silent_reporters_progress_bar_takes_every_call_a_bar_gets_and_shows_nothing(capsys):
    from llmctl.core.report import SILENT

    with SILENT.progress("calibrate", total=3, unit="layer") as bar:
        bar.advance()
        bar.advance(2)
        bar.update(total=5, completed=1, description="again")
    assert capsys.readouterr() == ("", "")


def test_an_asymmetric_transform_stores_zero_points_compressed_tensors_decompresses():
    """The transform's own scheme (not the default symmetric one) quantizes the linears it replaces."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from llmctl.core.quant.linear import PackQuantized

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(64, 8)
    with torch.no_grad():  # all-positive weights: a symmetric grid would waste half its levels
        model.proj.weight.copy_(torch.rand(8, 64, generator=g) * 0.5 + 0.25)
    dense = model.proj.weight.detach().clone()
    transform = PackQuantized(bits=4, group_size=32, symmetric=False, ignore=[])
    transform.apply(model)
    config = QuantizationConfig.model_validate(transform.quantization_config())
    state = {k: v for k, v in model.proj.state_dict().items() if k != "bias"}
    assert "weight_zero_point" in state and not model.proj.scheme.symmetric
    weight = PackedQuantizationCompressor.decompress(state, config.config_groups["group_0"])["weight"]
    step = (dense.view(8, 2, 32).amax(-1) - dense.view(8, 2, 32).amin(-1).clamp(max=0)) / 15
    assert ((weight - dense).abs().view(8, 2, 32) <= step.unsqueeze(-1) * 0.5001 + 1e-6).all()


def test_each_visited_block_gets_the_context_to_rerun_itself_and_a_default_description():
    """Pruners rerun the block they visit (`block(inputs, ctx)`) to see its linears' inputs."""
    from _recorder import Recorder

    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model
    from llmctl.core.prune.calibration import for_each_block

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                    intermediate_size=32, max_seq_len=16)).eval()
    tokens = torch.randint(0, 50, (2, 8))
    inputs, outputs, report = [], [], Recorder()

    def visit(i, block, hidden, ctx):
        inputs.append(hidden.clone())
        outputs.append(block(hidden, ctx)[0])

    last = for_each_block(model, tokens, visit, report)
    assert report.steps() == [("progress", "calibrate", 2, "layer"), ("advance", 1), ("advance", 1)]
    torch.testing.assert_close(outputs[0], inputs[1])
    torch.testing.assert_close(outputs[1], last)
    seen = {}
    model.model.norm.register_forward_pre_hook(lambda m, a: seen.setdefault("final", a[0]))
    with torch.no_grad():
        model(tokens)
    torch.testing.assert_close(last, seen["final"])


def test_calibration_tokens_follow_the_model_to_its_device():
    """A model on the meta device stands in for one on an accelerator, given tokens on the CPU."""
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model
    from llmctl.core.prune.calibration import for_each_block

    model = build_model(ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                    intermediate_size=32, max_seq_len=16)).to("meta")
    devices = []
    tokens = torch.randint(0, 50, (2, 8))
    last = for_each_block(model, tokens, lambda i, block, hidden, ctx: devices.append(hidden.device))
    assert [d.type for d in devices] == ["meta", "meta"] and last.device.type == "meta" and last.shape == (2, 8, 16)
