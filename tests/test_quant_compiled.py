"""`generate --compile` over quantized checkpoints (the packed int8/int4 CPU kernels take
16-bit inputs): the compiled decode step gives the eager step's tokens."""

import pytest
import torch

from conftest import tiny_llama
from llmctl.core.generate import GenerationConfig, generate
from llmctl.core.model.io import load_model, save_model
from llmctl.core.quant.config import QuantizeConfig
from llmctl.core.quant.linear import PackedLinear
from llmctl.core.quant.methods import quantize_model
from llmctl.core.tokenizer import load_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the birds.\n\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("qbase"), [TEXT] * 20, vocab=300, context=128)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_compiled_quantized_decoding_equals_eager(base, tmp_path, bits, group):
    model, _ = load_model(base)
    quantize_model(model, QuantizeConfig(method=f"int{bits}", bits=bits, group_size=group))
    save_model(model, tmp_path / "q", tokenizer_dir=base)
    model, tok = load_model(tmp_path / "q", dtype=torch.bfloat16)[0], load_tokenizer(tmp_path / "q")
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 14
    prompts = ["the cat", "a quick brown fox jumps"]
    cfg = dict(max_new_tokens=12, eos_ids=[])
    eager = generate(model, tok, prompts, GenerationConfig(**cfg))
    compiled = generate(model, tok, prompts, GenerationConfig(**cfg, compile=True))
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]
