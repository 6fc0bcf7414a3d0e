"""`llmctl export --format gguf`: files read back with gguf's reader (names checked against
gguf's own HF→GGUF name map), tokenizer metadata, quantization error, refusals, and — where
llama-cpp-python is installed — llama.cpp's greedy tokens equal to llmctl's."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

import gguf  # noqa: E402
torch = pytest.importorskip("torch")

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello llama", "one two three four five"] * 20
CONTEXT = 64
ARCHES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe", "phi3",
          "starcoder2", "phi", "gpt_neox", "gpt_neox_seq", "gemma3_text"]
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma": "gemma", "gemma2": "gemma2",
             "gpt2": "gpt2", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "phi3": "llama",
             "starcoder2": "starcoder2", "phi": "phi2", "gpt_neox": "gptneox", "gpt_neox_seq": "gptneox",
             "gemma3_text": "gemma3"}


def _llama(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return tiny_llama(path, TEXTS, vocab=300, context=CONTEXT)


def _config(kind: str, vocab: int):
    import transformers as tr

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    if kind == "mistral":
        return tr.MistralForCausalLM, tr.MistralConfig(**common, sliding_window=CONTEXT // 2)
    if kind == "qwen2":
        return tr.Qwen2ForCausalLM, tr.Qwen2Config(**common)
    if kind == "qwen3":
        return tr.Qwen3ForCausalLM, tr.Qwen3Config(**common, head_dim=16)  # head_dim ≠ hidden / heads
    if kind == "gemma":
        return tr.GemmaForCausalLM, tr.GemmaConfig(**{**common, "tie_word_embeddings": True}, head_dim=8)
    if kind == "gemma2":  # layer 0 slides over 4 tokens (llama.cpp: the even layers), scores scaled by head_dim
        return tr.Gemma2ForCausalLM, tr.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=8,
                                                     query_pre_attn_scalar=8, sliding_window=4,
                                                     attn_logit_softcapping=2.0, final_logit_softcapping=10.0)
    if kind == "mixtral":
        return tr.MixtralForCausalLM, tr.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if kind == "qwen2_moe":
        return tr.Qwen2MoeForCausalLM, tr.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=48,
                                                         norm_topk_prob=False)
    if kind == "qwen3_moe":
        return tr.Qwen3MoeForCausalLM, tr.Qwen3MoeConfig(**common, **moe, head_dim=16, norm_topk_prob=True)
    if kind == "phi3":
        return tr.Phi3ForCausalLM, tr.Phi3Config(**common)
    if kind == "starcoder2":
        return tr.Starcoder2ForCausalLM, tr.Starcoder2Config(**common)
    if kind == "phi":  # Phi-2: one norm before attention and MLP in parallel, half of each head rotated
        return tr.PhiForCausalLM, tr.PhiConfig(**common, partial_rotary_factor=0.5)
    if kind in ("gpt_neox", "gpt_neox_seq"):  # Pythia: 4 of each head's 16 dims rotated, biases everywhere
        return tr.GPTNeoXForCausalLM, tr.GPTNeoXConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            rotary_pct=0.25, max_position_embeddings=CONTEXT, use_parallel_residual=kind == "gpt_neox",
            bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    if kind == "gemma3_text":  # layers 0-4 slide over 4 tokens (RoPE base 100), layer 5 attends to all (base 1e6)
        rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
        return tr.Gemma3ForCausalLM, tr.Gemma3TextConfig(**{**common, "tie_word_embeddings": True,
                                                            "num_hidden_layers": 6}, head_dim=8,
                                                         query_pre_attn_scalar=8, sliding_window=4,
                                                         rope_parameters=rope)
    if kind == "gpt2":
        return tr.GPT2LMHeadModel, tr.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                                 n_positions=CONTEXT, bos_token_id=0, eos_token_id=1)
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny HF checkpoint per architecture, all with the same byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("gguf-ckpts")
    out = {"llama": _llama(root / "llama")}
    vocab = json.loads((out["llama"] / "config.json").read_text())["vocab_size"]
    for kind in ARCHES[1:]:
        cls, config = _config(kind, vocab)
        torch.manual_seed(1)
        model = cls(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name and "ln_" not in name:
                    p.mul_(6.0)  # a peaked distribution: greedy decoding far from ties
        # llama.cpp reads a model *named* phi3 as Phi-3's chat vocabulary (it looks up `<|end|>`)
        path = root / ("fused" if kind == "phi3" else kind)
        model.save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(out["llama"] / f, path / f)
        out[kind] = path
    return out


def _export(llmctl, ckpt: Path, out: Path, type: str = "f32", *extra):
    r = llmctl("--json", "export", ckpt, "-o", out, "--type", type, *extra)
    assert r.code == 0, r.stderr
    return r.json()


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def _hf_tensors(ckpt: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(ckpt / "model.safetensors").items()}


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved rope rows back to HF's rotate-half order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _expected(kind: str, ckpt: Path) -> dict[str, np.ndarray]:
    """The GGUF tensors llama.cpp expects, from the HF tensors through gguf's own name map."""
    hf = _hf_tensors(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    if kind == "phi3":  # written as a Llama: the fused q/k/v and gate/up rows apart
        q, kv = (cfg[k] * cfg["hidden_size"] // cfg["num_attention_heads"]
                 for k in ("num_attention_heads", "num_key_value_heads"))
        for name in [n for n in hf if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))]:
            fused = hf.pop(name)
            parts = ("q", "k", "v") if "qkv" in name else ("gate", "up")
            for p, t in zip(parts, np.split(fused, [q, q + kv] if len(parts) == 3 else 2)):
                hf[name.replace("qkv_proj" if len(parts) == 3 else "gate_up_proj", f"{p}_proj")] = t
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[GGUF_ARCH[kind].upper()], layers)
    out: dict[str, list] = {}
    for name, t in sorted(hf.items()):
        if kind == "gpt2" and (name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")):
            continue
        if cfg.get("tie_word_embeddings", kind == "gpt2") and name == "lm_head.weight":
            continue
        expert = None
        if ".experts." in name:  # Mixtral: one stacked tensor per projection
            parts = name.split(".")
            expert = int(parts[parts.index("experts") + 1])
            name = name.replace(f".experts.{expert}.", ".experts.")
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert mapped is not None, name
        if kind == "gpt2" and t.ndim == 2 and any(k in name for k in ("c_attn", "c_proj", "c_fc")):
            t = t.T  # Conv1D stores [in, out]
        if kind.startswith("gpt_neox") and "query_key_value" in name:  # HF: [head, q|k|v, dim] rows; llama.cpp: [q; k; v]
            heads = cfg["num_attention_heads"]
            t = t.reshape(heads, 3, -1, *t.shape[1:]).swapaxes(0, 1).reshape(t.shape)
        if kind in ("gemma", "gemma2", "gemma3_text") and name.endswith("norm.weight"):
            t = t + 1
        if mapped.endswith("ffn_gate_inp_shexp.weight"):
            t = t.reshape(-1)  # llama.cpp reads the shared expert's one-row gate as a vector
        out.setdefault(mapped, []).append((expert, t))
    return {k: np.stack([t for _, t in sorted(v)]) if v[0][0] is not None else v[0][1] for k, v in out.items()}


@pytest.mark.parametrize("kind", ARCHES)
def test_f32_round_trip(kind, checkpoints, llmctl, tmp_path):
    """Every tensor exact (q/k rows in llama.cpp's rope order for the Llama family), the metadata right."""
    ckpt = checkpoints[kind]
    result = _export(llmctl, ckpt, tmp_path / "m.gguf")
    assert result["architecture"] == GGUF_ARCH[kind] and set(result["tensor_types"]) == {"F32"}
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    got = {t.name: np.array(t.data) for t in reader.tensors}
    want = _expected(kind, ckpt)
    assert sorted(got) == sorted(want)
    cfg = json.loads((ckpt / "config.json").read_text())
    heads, kv = cfg.get("num_attention_heads", cfg.get("n_head")), cfg.get("num_key_value_heads")
    for name, data in got.items():
        if GGUF_ARCH[kind] == "llama" and ".attn_q." in name:
            data = _unpermute(data, heads)
        elif GGUF_ARCH[kind] == "llama" and ".attn_k." in name:
            data = _unpermute(data, kv)
        np.testing.assert_array_equal(data, want[name], err_msg=name)
    f = _fields(reader)
    arch = GGUF_ARCH[kind]
    assert f["general.architecture"] == arch
    assert f[f"{arch}.block_count"] == cfg.get("num_hidden_layers", 2)
    assert f[f"{arch}.embedding_length"] == cfg.get("hidden_size", 32)
    assert f[f"{arch}.context_length"] == CONTEXT and f[f"{arch}.attention.head_count"] == 4
    if kind == "gpt2":
        assert f["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg["layer_norm_epsilon"])
    else:
        assert f[f"{arch}.attention.head_count_kv"] == cfg.get("num_key_value_heads", 4)
        if kind in ("starcoder2", "phi", "gpt_neox", "gpt_neox_seq"):
            eps = cfg["norm_epsilon" if kind == "starcoder2" else "layer_norm_eps"]
            assert f[f"{arch}.attention.layer_norm_epsilon"] == pytest.approx(eps)
        else:
            assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("full_attention", rope).get("rope_theta", cfg.get("rope_theta"))
        assert f[f"{arch}.rope.freq_base"] == pytest.approx(theta)
    if kind == "qwen3":
        assert f["qwen3.attention.key_length"] == 16 and f["qwen3.rope.dimension_count"] == 16
    if kind == "phi":
        assert f["phi2.rope.dimension_count"] == 4  # half of head_dim 8
    if arch == "gptneox":
        assert f["gptneox.rope.dimension_count"] == 4  # a quarter of head_dim 16
        assert f["gptneox.use_parallel_residual"] == (kind == "gpt_neox")
    if kind == "gemma3_text":
        assert f["gemma3.attention.sliding_window"] == 4 and f["gemma3.rope.freq_base_swa"] == 100.0
        assert f["gemma3.attention.sliding_window_pattern"] == [True] * 5 + [False]
    if kind == "mixtral":
        assert f["llama.expert_count"] == 4 and f["llama.expert_used_count"] == 2
    if kind == "mistral":
        assert f["llama.attention.sliding_window"] == CONTEXT // 2
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    vocab = tok["model"]["vocab"]
    assert [f["tokenizer.ggml.tokens"][i] for i in vocab.values()] == list(vocab)
    assert f["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # the special tokens are control tokens
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (0, 1)


def test_quantized_types(checkpoints, llmctl, tmp_path):
    """q8_0 / q4_0 within their quantization error of f32; 1-D tensors stay f32; bf16 exact to bf16."""
    ckpt = checkpoints["llama"]
    _export(llmctl, ckpt, tmp_path / "f32.gguf")
    ref = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "f32.gguf").tensors}
    for type, bound in (("q8_0", 0.01), ("q4_0", 0.15), ("bf16", 0.005), ("f16", 0.001)):
        _export(llmctl, ckpt, tmp_path / f"{type}.gguf", type)
        reader = gguf.GGUFReader(tmp_path / f"{type}.gguf")
        assert _fields(reader)["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{type.upper()}"]
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref[t.name].shape)
            if ref[t.name].ndim == 1:
                assert t.tensor_type.name == "F32"
                np.testing.assert_array_equal(data, ref[t.name])
            else:
                assert t.tensor_type.name == type.upper(), t.name
                err = np.abs(data - ref[t.name]).max() / np.abs(ref[t.name]).max()
                assert 0 < err < bound, (type, t.name, err)


def test_q4_k_m_mix(tmp_path, llmctl):
    """q4_k_m: Q4_K with Q6_K for the output and some attn_v / ffn_down layers, as llama.cpp mixes;
    rows too short for 256-value blocks fall back to q8_0."""
    import transformers as tr

    from llmctl.core.export.gguf import _q4_k_m, Item

    ckpt = _llama(tmp_path / "ck")
    config = tr.LlamaConfig(**{**json.loads((ckpt / "config.json").read_text()), "hidden_size": 256,
                               "intermediate_size": 512, "num_hidden_layers": 8, "head_dim": None})
    tr.LlamaForCausalLM(config).save_pretrained(ckpt)
    out = tmp_path / "m.gguf"
    _export(llmctl, ckpt, out, "q4_k_m")
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    six = [i for i in range(8) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert six == [0, 3, 6, 7] and six == [i for i in range(8) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert _q4_k_m(Item("blk.1.attn_q.weight", (32, 256), [], "one", 1), 8) == "Q4_K"
    hf = _hf_tensors(ckpt)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_down.weight" or t.name == "blk.1.ffn_up.weight":
            src = hf["model.layers.0.mlp.down_proj.weight" if "down" in t.name else "model.layers.1.mlp.up_proj.weight"]
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape)
            rel = np.sqrt(((data - src) ** 2).mean()) / src.std()
            assert rel < (0.03 if t.tensor_type.name == "Q6_K" else 0.1), (t.name, rel)
    small = tmp_path / "small.gguf"
    _export(llmctl, _llama(tmp_path / "small"), small, "q4_k_m")
    assert {t.tensor_type.name for t in gguf.GGUFReader(small).tensors} == {"F32", "Q8_0"}


def test_k_quants_decode_with_ggufs_reader():
    """Our Q4_K / Q6_K bytes decode (with gguf's dequantizer) to within their error; exact codes stay exact."""
    from llmctl.core.export.kquants import quantize_q4_k, quantize_q6_k

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    x[:, :256] += 1.5  # blocks far from zero need the Q4_K offset
    for fn, name, bound in ((quantize_q4_k, "Q4_K", 0.1), (quantize_q6_k, "Q6_K", 0.03)):
        y = gguf.quants.dequantize(fn(x), gguf.GGMLQuantizationType[name])
        assert np.sqrt(((x - y) ** 2).mean()) / x.std() < bound
    codes = rng.integers(-32, 32, size=(4, 256)).astype(np.float32)
    codes[:, ::16] = -32  # each 16-value group reaches the extreme code
    step = np.float32(127 / 256)  # a sub-block scale of 127 × a float16-exact 1/256
    back = gguf.quants.dequantize(quantize_q6_k(codes * step), gguf.GGMLQuantizationType.Q6_K)
    np.testing.assert_array_equal(back, codes * step)


def _tokenizer_checkpoint(tmp_path, llmctl, algorithm: str) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    r = llmctl("tokenize", "train", corpus, "-o", tmp_path / "tok", "--vocab-size", "290",
               "--algo", algorithm)
    assert r.code == 0, r.stderr
    ckpt = _llama(tmp_path / "ck")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "tok" / f, ckpt / f)
    return ckpt


@pytest.mark.parametrize("algorithm", ["unigram", "bpe", "bpe_bytes"])
def test_sentencepiece_style_vocab(algorithm, tmp_path, llmctl):
    """Metaspace tokenizers become llama.cpp's `llama` model: scores, byte and control token types, padding."""
    ckpt = _tokenizer_checkpoint(tmp_path, llmctl, algorithm)
    _export(llmctl, ckpt, tmp_path / "m.gguf")
    f = _fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    n = len(f["tokenizer.ggml.tokens"])
    assert n == json.loads((ckpt / "config.json").read_text())["vocab_size"]
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.scores"]) == n
    types, scores = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    size = len(f["tokenizer.ggml.tokens"]) - types.count(5)
    assert all(t == f"[PAD{i}]" for i, t in enumerate(f["tokenizer.ggml.tokens"]) if types[i] == 5)
    from tokenizers import Tokenizer

    assert size == Tokenizer.from_file(str(ckpt / "tokenizer.json")).get_vocab_size(with_added_tokens=True) < n
    specials = {a["id"] for a in tok["added_tokens"]}
    assert all(types[i] in (2, 3) for i in specials)
    if algorithm == "unigram":
        for i, (piece, score) in enumerate(tok["model"]["vocab"]):
            assert f["tokenizer.ggml.tokens"][i] == piece and scores[i] == pytest.approx(score)
    elif algorithm == "bpe_bytes":
        assert types.count(6) == 256 and f["tokenizer.ggml.tokens"][types.index(6)] == "<0x00>"
    else:
        assert types.count(6) == 0
        vocab = tok["model"]["vocab"]
        first = "".join(tok["model"]["merges"][0].split(" ") if isinstance(tok["model"]["merges"][0], str)
                        else tok["model"]["merges"][0])
        assert scores[vocab[first]] == -1.0 and max(scores) == 0.0


def test_refusals_and_force(checkpoints, llmctl, tmp_path, monkeypatch):
    """Encoders and llmctl-only configs are refused naming the reason; --force replaces only a GGUF file."""
    import transformers as tr

    bert = tmp_path / "bert"
    tr.BertForMaskedLM(tr.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)).save_pretrained(bert)
    r = llmctl("export", bert, "-o", tmp_path / "b.gguf")
    assert r.code == 2 and "encoder" in r.stderr and not (tmp_path / "b.gguf").exists()
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "llmctl", "vocab_size": 64, "hidden_size": 16,
                                                    "num_layers": 1, "num_heads": 2, "position": "alibi"}))
    from safetensors.torch import save_file

    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    model = build_model(ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, position="alibi"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              custom / "model.safetensors")
    r = llmctl("export", custom, "-o", tmp_path / "c.gguf")
    assert r.code == 2 and "no Hugging Face architecture" in r.stderr, r.stderr
    moe = tmp_path / "moe"
    shutil.copytree(checkpoints["qwen3_moe"], moe)
    (moe / "config.json").write_text(json.dumps({**json.loads((moe / "config.json").read_text()),
                                                 "norm_topk_prob": False}))
    r = llmctl("export", moe, "-o", tmp_path / "moe.gguf")
    assert r.code == 2 and "renormalizes the top-k" in r.stderr, r.stderr
    r = llmctl("export", checkpoints["llama"], "-o", tmp_path / "x.gguf", "--type", "q3")
    assert r.code == 2 and "q4_0" in r.stderr
    r = llmctl("export", checkpoints["llama"], "-o", tmp_path / "x.gguf", "--format", "ggfu")
    assert r.code == 2 and "did you mean 'gguf'" in r.stderr
    other = tmp_path / "notes.gguf"
    other.write_text("my notes")
    r = llmctl("--force", "export", checkpoints["llama"], "-o", other)
    assert r.code != 0 and other.read_text() == "my notes"
    out = tmp_path / "m.gguf"
    _export(llmctl, checkpoints["llama"], out, "q8_0")
    r = llmctl("export", checkpoints["llama"], "-o", out)
    assert r.code != 0 and "--force" in r.stderr
    _export(llmctl, checkpoints["llama"], out, "f32", "--force")
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"F32"}
    monkeypatch.setitem(sys.modules, "gguf", None)
    r = llmctl("export", checkpoints["llama"], "-o", tmp_path / "y.gguf")
    assert r.code == 2 and "pip install 'llmctl[gguf]'" in r.stderr


@pytest.fixture(scope="module")
def adapter(checkpoints, tmp_path_factory) -> Path:
    """A LoRA adapter (non-zero B) on the tiny Llama, in PEFT's format."""
    from llmctl.core.adapters import LoRA, save_adapter
    from llmctl.core.model.io import load_model

    model, _ = load_model(checkpoints["llama"], transforms=[LoRA(r=4, target_modules=["q_proj", "v_proj", "down_proj"])])
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "lora", base=checkpoints["llama"])


def test_adapter_is_merged_on_the_fly(adapter, checkpoints, llmctl, tmp_path):
    """An adapter directory exports as PEFT's merge_and_unload of it, with its base's tokenizer."""
    import transformers
    from peft import PeftModel

    _export(llmctl, adapter, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    PeftModel.from_pretrained(hf, adapter).merge_and_unload().save_pretrained(tmp_path / "merged")
    want = _expected("llama", tmp_path / "merged")
    got = {t.name: np.array(t.data) for t in reader.tensors}
    assert sorted(got) == sorted(want)
    for name, data in got.items():
        data = _unpermute(data, 4) if ".attn_q." in name else _unpermute(data, 2) if ".attn_k." in name else data
        np.testing.assert_allclose(data, want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert not np.allclose(got["blk.0.attn_v.weight"], _expected("llama", checkpoints["llama"])["blk.0.attn_v.weight"])
    assert _fields(reader)["tokenizer.ggml.model"] == "gpt2"


def test_quantized_checkpoint_is_dequantized(checkpoints, llmctl, tmp_path):
    """An nf4 checkpoint exports its dequantized weights; re-quantizing warns about quantizing twice."""
    from llmctl.core.model.io import load_model, save_model
    from llmctl.core.quant.nf4 import NF4

    model, _ = load_model(checkpoints["llama"], transforms=[NF4()])
    save_model(model, tmp_path / "nf4", tokenizer_dir=checkpoints["llama"])
    r = llmctl("export", tmp_path / "nf4", "-o", tmp_path / "q.gguf", "--type", "q8_0")
    assert r.code == 0 and "quantizing twice" in r.stderr, r.stderr
    r = llmctl("export", tmp_path / "nf4", "-o", tmp_path / "f.gguf", "--type", "f32")
    assert r.code == 0 and "dequantized" in r.stderr and "twice" not in r.stderr
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "f.gguf").tensors}
    loaded, _ = load_model(tmp_path / "nf4")
    v = loaded.get_submodule("model.layers.1.self_attn.v_proj")
    np.testing.assert_array_equal(got["blk.1.attn_v.weight"], v.dequantize(torch.float32).numpy())
    original = _expected("llama", checkpoints["llama"])["blk.1.attn_v.weight"]
    err = np.abs(got["blk.1.attn_v.weight"] - original).max() / np.abs(original).max()
    assert 0 < err < 0.2


def test_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """When each tensor is quantized, the live numpy memory is about that one tensor, not the model."""
    import tracemalloc

    import transformers as tr

    from llmctl.core.export import gguf as export_gguf

    config = tr.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT)
    model = tr.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "ck")
    largest = max(p.numel() for p in model.parameters()) * 4
    total = sum(p.numel() for p in model.parameters()) * 4
    numpy_only = [tracemalloc.DomainFilter(True, 389047)]  # numpy's tracemalloc domain
    live = []

    def quantize(data, type_name):
        out = quantize.original(data, type_name)
        live.append(sum(t.size for t in tracemalloc.take_snapshot().filter_traces(numpy_only).traces))
        return out

    quantize.original = export_gguf.quantize
    monkeypatch.setattr(export_gguf, "quantize", quantize)
    tracemalloc.start()
    try:
        export_gguf.GGUFExporter().export(tmp_path / "ck", tmp_path / "m.gguf", type="q8_0")
    finally:
        tracemalloc.stop()
    assert len(live) == 8 * 9 + 3 and total > 20 * largest
    assert 0 < max(live) < 2 * largest, (max(live), largest, total)


# ------------------------------------------------------------------------------- llama.cpp itself


def _llmctl_greedy(ckpt: Path, ids: list[int], n: int) -> list[int]:
    from llmctl.core.model.io import load_model

    model, _ = load_model(ckpt, dtype=torch.float32)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _llama_cpp(path: Path):
    """llama.cpp on a GGUF file: all positions' logits, a float32 KV cache, one thread."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=CONTEXT, n_threads=1, n_batch=CONTEXT, verbose=False,
                           logits_all=True, type_k=0, type_v=0)


def _llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = _llama_cpp(path)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def _llama_cpp_greedy(path: Path, text: str, n: int) -> tuple[list[int], list[int]]:
    llm = _llama_cpp(path)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return ids, out
    finally:
        llm.close()


@pytest.mark.parametrize("kind", [*ARCHES, "lora"])
def test_llama_cpp_greedy_equals_llmctl(kind, checkpoints, adapter, llmctl, tmp_path):
    """llama.cpp tokenizes the prompt as llmctl does and decodes the same greedy tokens (f32)."""
    pytest.importorskip("llama_cpp")
    from llmctl.core.tokenizer import load_tokenizer

    ckpt = adapter if kind == "lora" else checkpoints[kind]
    _export(llmctl, ckpt, tmp_path / "m.gguf")
    text = "the quick brown fox, hello"
    ids, theirs = _llama_cpp_greedy(tmp_path / "m.gguf", text, 12)
    assert ids == load_tokenizer(checkpoints["llama"]).encode(text)
    assert theirs == _llmctl_greedy(ckpt, ids, 12)


@pytest.fixture(scope="module")
def wide_llama(checkpoints, tmp_path_factory) -> Path:
    """A Llama with 256-wide rows, so that every GGUF type (k-quants included) applies."""
    import transformers as tr

    out = tmp_path_factory.mktemp("wide") / "ck"
    config = tr.LlamaConfig(**{**json.loads((checkpoints["llama"] / "config.json").read_text()),
                               "hidden_size": 256, "intermediate_size": 512, "head_dim": None})
    torch.manual_seed(3)
    model = tr.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("type", ["f16", "bf16", "q8_0", "q4_0", "q4_k_m"])
def test_llama_cpp_reads_each_type(type, wide_llama, llmctl, tmp_path):
    """llama.cpp's logits on a quantized file equal llmctl's with the file's dequantized weights
    (within llama.cpp's own activation rounding), far closer than to the unquantized model."""
    pytest.importorskip("llama_cpp")
    from llmctl.core.model.io import load_model

    _export(llmctl, wide_llama, tmp_path / "m.gguf", type)
    model, cfg = load_model(wide_llama, dtype=torch.float32)
    ids = [50, 60, 70, 80, 90, 100]
    with torch.no_grad():
        original = model(torch.tensor([ids])).logits[0].numpy()
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
        ours = {names.get_name(n, try_suffixes=(".weight",)): n for n in model.state_dict()}
        for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
            if ".attn_q." in t.name or ".attn_k." in t.name:
                w = _unpermute(w, cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads)
            model.get_parameter(ours[t.name]).copy_(torch.from_numpy(np.ascontiguousarray(w)))
        dequantized = model(torch.tensor([ids])).logits[0].numpy()
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", ids)
    scale = np.abs(dequantized).max()
    assert np.abs(theirs - dequantized).max() / scale < 0.06
    if type in ("q4_0", "q4_k_m"):  # coarse enough that reading the blocks wrong could not hide
        assert np.abs(theirs - dequantized).max() < np.abs(original - dequantized).max() / 2


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scaling(scaling, checkpoints, llmctl, tmp_path):
    """Scaled RoPE: the scaling keys (llama3: a rope_freqs tensor); where llama.cpp is installed,
    its logits past the original context equal llmctl's."""
    import transformers as tr

    from llmctl.core.model.io import load_model

    base = json.loads((checkpoints["llama"] / "config.json").read_text())
    base["rope_parameters"] = {"rope_theta": 10000.0, **ROPE_SCALINGS[scaling]}
    torch.manual_seed(4)
    tr.LlamaForCausalLM(tr.LlamaConfig(**base)).save_pretrained(tmp_path / "ck")
    _export(llmctl, tmp_path / "ck", tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    f = _fields(reader)
    if scaling == "llama3":
        assert "llama.rope.scaling.type" not in f
        freqs = next(np.array(t.data) for t in reader.tensors if t.name == "rope_freqs.weight")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = tr.LlamaConfig.from_pretrained(tmp_path / "ck")
        scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]
        default = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
        np.testing.assert_allclose(freqs, (default / scaled).numpy(), rtol=1e-5)  # llama.cpp divides by these
    else:
        assert f["llama.rope.scaling.type"] == scaling and f["llama.rope.scaling.factor"] == 4.0
    pytest.importorskip("llama_cpp")
    ids = list(range(40, 64))  # past the original 16 positions
    model, _ = load_model(tmp_path / "ck", dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max())


GEMMA = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "query_pre_attn_scalar": 8}


@pytest.mark.parametrize("model_type,edit,match", [
    ("gemma3_text", {"final_logit_softcapping": 30.0}, "llama.cpp's gemma3 never caps the logits"),
    ("gemma3_text", {"query_pre_attn_scalar": 12}, "llama.cpp's gemma3 scales the attention scores by 8 \\*\\* -0.5"),
    ("gemma3_text", {"tie_word_embeddings": False}, "gemma3 ties the output head to the embeddings"),
    ("gemma2", {"query_pre_attn_scalar": 12}, "llama.cpp's gemma2 scales the attention scores by 8 \\*\\* -0.5"),
    ("gemma2", {"layer_types": ["full_attention", "sliding_attention"] * 2}, "gemma2 slides on the even layers"),
    ("gemma2", {"layer_types": ["sliding_attention"] * 4}, "gemma2 slides on the even layers"),
    ("gemma2", {"final_logit_softcapping": None}, "gemma2 always caps the attention scores and the logits"),
    ("gemma2", {"tie_word_embeddings": False}, "gemma2 ties the output head to the embeddings"),
])
def test_gemma_configs_llama_cpp_cannot_run_are_refused_in_one_line(model_type, edit, match):
    """What llama.cpp's gemma2 / gemma3 graphs fix (gemma2's window pattern, the caps, the score scale,
    the tied head) is refused naming why, not mistaken for llama.cpp lacking the architecture."""
    from llmctl.core.export.gguf import family_of
    from llmctl.core.hf import config_from_hf
    from llmctl.errors import UsageError

    cfg = config_from_hf({"model_type": model_type, **GEMMA, **edit})
    assert cfg.norm_placement == "sandwich"
    with pytest.raises(UsageError, match=rf"^cannot export [^\n]*{match}[^\n]*$"):
        family_of(cfg)
    assert family_of(config_from_hf({"model_type": model_type, **GEMMA}))[1].arch == model_type.removesuffix("_text")


@pytest.mark.parametrize("family,kwargs,match", [
    ("GPTNeoX", dict(attention_bias=False), r"this gpt_neox model to GGUF: llama.cpp's gptneox requires the attention"),
    ("Phi", dict(qk_layernorm=True), r"this phi model to GGUF: llama.cpp's phi2 has no qk-norm"),
    ("Phi3", dict(partial_rotary_factor=0.5), r"this phi3 model to GGUF: llama.cpp's llama has no partial rotary"),
])
def test_what_llama_cpp_does_not_compute_is_refused(family, kwargs, match, llmctl, tmp_path):
    """A GPT-NeoX without biases, a Phi with qk-norm and a partial-rotary Phi-3: one error line, no file."""
    import transformers as tr

    config = getattr(tr, f"{family}Config")(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                            **kwargs)
    getattr(tr, f"{family}ForCausalLM")(config).save_pretrained(tmp_path / "m")
    r = llmctl("export", tmp_path / "m", "-o", tmp_path / "m.gguf")
    assert r.code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert re.search(match, r.stderr) and not (tmp_path / "m.gguf").exists()


def test_phi2_logits_equal_llama_cpps(checkpoints, llmctl, tmp_path):
    """Phi-2 as llama.cpp's phi2 (parallel attention and MLP under one norm, half of each head
    rotated, the head's bias): every position's logits equal llmctl's (f32) to ggml's GELU, a float16
    table of the tanh form (max |Δ| 1.0e-3 of 2.4 here; GPT-2's and StarCoder2's the same, Llama's 1.3e-4)."""
    pytest.importorskip("llama_cpp")
    from llmctl.core.model.io import load_model

    _export(llmctl, checkpoints["phi"], tmp_path / "m.gguf")
    ids = torch.randint(3, 250, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    model, _ = load_model(checkpoints["phi"])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_llama_cpp_logits(tmp_path / "m.gguf", ids), ours, atol=1e-3 * np.abs(ours).max())


def test_llama_cpp_gemma2_logits_equal_llmctl(checkpoints, llmctl, tmp_path):
    """Gemma 2 in llama.cpp (f32): the same logits as llmctl's to 5e-3 over 37 tokens, past the
    4-token window of layer 0, where dropping the window, either cap or the score scale moves them by 0.06+."""
    pytest.importorskip("llama_cpp")
    import dataclasses

    from llmctl.core.model import Transformer
    from llmctl.core.model.io import load_model

    _export(llmctl, checkpoints["gemma2"], tmp_path / "m.gguf")
    ids = list(range(3, 40))
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", ids)
    ours, cfg = load_model(checkpoints["gemma2"])
    for change in ({}, dict(logit_softcap=None), dict(attention_softcap=None), dict(layer_sliding_windows=None),
                   dict(attention_scale_dim=12.0)):
        model = Transformer(dataclasses.replace(cfg, **change)).eval()
        model.load_state_dict(ours.state_dict())
        with torch.no_grad():
            delta = np.abs(theirs - model(torch.tensor([ids])).logits[0].numpy()).max()
        assert delta < 5e-3 if not change else delta > 0.05, (change, delta)


@pytest.mark.parametrize("kind", ["gpt_neox", "gpt_neox_seq"])
def test_gpt_neox_logits_equal_llama_cpps(kind, checkpoints, llmctl, tmp_path):
    """Pythia as llama.cpp's gptneox (q/k/v rows [q; k; v], NeoX rope on a quarter of each head, the
    residual llama.cpp reads from use_parallel_residual): every position's logits equal llmctl's (f32)
    to 1e-3 of their scale, as phi2's, though llama.cpp computes GELU's tanh form (export warns; max |Δ|
    1.8e-3 of 3.8 parallel, 2.3e-3 of 4.1 sequential); the other residual moves them by 5%+ of it."""
    pytest.importorskip("llama_cpp")
    from llmctl.core.model.io import load_model

    r = llmctl("export", checkpoints[kind], "-o", tmp_path / "m.gguf", "--type", "f32")
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert r.code == 0 and len(warnings) == 1 and "tanh approximation of this model's exact gelu" in warnings[0], r.stderr
    ids = torch.randint(3, 250, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", ids)
    ours, cfg = load_model(checkpoints[kind])
    _assert_matches_as_configured(ours, cfg, ids, theirs,
                                  [dict(residual="sequential" if cfg.residual == "parallel" else "parallel")])


def _assert_matches_as_configured(ours, cfg, ids: list[int], theirs, changes: list[dict]) -> None:
    """llama.cpp's logits `theirs` are ours to 1e-3 of their scale, and each config change in
    `changes` moves ours by 5%+ of it (the match is no accident)."""
    import dataclasses

    from llmctl.core.model import Transformer

    for change in ({}, *changes):
        model = Transformer(dataclasses.replace(cfg, **change)).eval()
        model.load_state_dict(ours.state_dict())
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        delta = np.abs(theirs - logits).max() / np.abs(logits).max()
        assert delta < 1e-3 if not change else delta > 0.05, (change, delta)


def test_gpt_neox_tied_head_is_written_as_its_own_tensor(checkpoints, llmctl, tmp_path):
    """llama.cpp's gptneox requires output.weight: a tied head is written as a copy of the embedding."""
    import transformers as tr

    config = tr.GPTNeoXConfig.from_pretrained(checkpoints["gpt_neox"], tie_word_embeddings=True)
    torch.manual_seed(5)
    tr.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "ck")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoints["gpt_neox"] / f, tmp_path / "ck" / f)
    _export(llmctl, tmp_path / "ck", tmp_path / "m.gguf")
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    np.testing.assert_array_equal(got["output.weight"], got["token_embd.weight"])
    if _has_llama_cpp():
        ids, theirs = _llama_cpp_greedy(tmp_path / "m.gguf", "the quick brown fox", 8)
        assert theirs == _llmctl_greedy(tmp_path / "ck", ids, 8)


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def test_llama_cpp_gemma3_logits_equal_llmctl(checkpoints, llmctl, tmp_path):
    """Gemma 3 in llama.cpp (f32): the same logits as llmctl's to 1e-3 of their scale over 37 tokens (max |Δ|
    1.8e-3 of 2.9 here), past the 4-token window of layers 0-4, where dropping the windows, the sliding layers'
    own RoPE base (100) or the score scale moves them by 5%+ of it; a pattern other than every 6th layer global is
    written too (warned)."""
    pytest.importorskip("llama_cpp")
    from llmctl.core.model.io import load_model

    _export(llmctl, checkpoints["gemma3_text"], tmp_path / "m.gguf")
    ids = list(range(3, 40))
    theirs = _llama_cpp_logits(tmp_path / "m.gguf", ids)
    ours, cfg = load_model(checkpoints["gemma3_text"])
    _assert_matches_as_configured(ours, cfg, ids, theirs, [dict(layer_sliding_windows=None),
                                                           dict(local_rope_theta=10000.0), dict(attention_scale_dim=12.0)])
    alternate = tmp_path / "alternate"  # the same weights, sliding on the even layers only
    shutil.copytree(checkpoints["gemma3_text"], alternate)
    config = json.loads((alternate / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"] * 3
    (alternate / "config.json").write_text(json.dumps(config))
    r = llmctl("export", alternate, "-o", tmp_path / "a.gguf", "--type", "f32")
    assert r.code == 0 and "slides on layers 0, 2, 4" in r.stderr, r.stderr
    model, _ = load_model(alternate)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_llama_cpp_logits(tmp_path / "a.gguf", ids), ours, atol=1e-3 * np.abs(ours).max())
