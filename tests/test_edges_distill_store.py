"""Edges of the stored teacher top-k and of the student made from the teacher (found by mutation
testing): the store's files byte for byte against transformers' log-softmax top-k of the windows
read straight from the shards, its split into files, 16- and 32-bit ids at the 65,536-token
boundary, the manifest, every refusal word for word; `copy_teacher_layers` block for block, the
per-layer sizes of a pruned teacher, and the tokenizer check; the chunked loss's gradients against
autograd through the whole loss."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from _recorder import Recorder
from conftest import tiny_llama
from llmctl.errors import ConfigError, DataError

SEQ, K, CONTEXT = 8, 5, 32
WORDS = ("the cat sat on a mat while seven dogs ran past the old red barn and every bird sang loud "
         "songs about rain snow wind sun moon stars rivers hills").split()


def _texts(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny transformers Llama teacher with its tokenizer, and token shards encoded with it."""
    from llmctl.core.data import Corpus, encode_corpus
    from llmctl.core.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("store")
    (root / "teacher").mkdir()
    texts = _texts()
    teacher = tiny_llama(root / "teacher", texts, vocab=300, context=CONTEXT, scale=4.0, hidden=16, intermediate=32)
    (root / "corpus.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (root / "shards").mkdir()
    encode_corpus(Corpus([str(root / "corpus.txt")]), load_tokenizer(teacher), root / "shards", val_fraction=0.1)
    (root / "few.txt").write_text("\n".join(texts[:3]) + "\n", encoding="utf-8")
    (root / "few").mkdir()
    encode_corpus(Corpus([str(root / "few.txt")]), load_tokenizer(teacher), root / "few")
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    assert vocab > 256  # the byte alphabet and a few merges
    return {"root": root, "teacher": teacher, "shards": root / "shards", "few": root / "few",
            "vocab": vocab}


def _windows(shards, seq_len):
    """Every sequential window of the train split, by hand: tokens j·seq_len … of each stream."""
    from llmctl.core.data.shards import TokenShards

    rows = []
    for stream in TokenShards(shards).split("train"):
        for j in range((len(stream) - 1) // seq_len):
            rows.append(np.asarray(stream[j * seq_len:(j + 1) * seq_len], dtype=np.int64))
    return torch.from_numpy(np.stack(rows))


def _reference(teacher, rows):
    """transformers' log-softmax of the teacher at every position of `rows`."""
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(rows).logits.float(), -1).numpy()


def _assert_top_k(ids, values, logprobs):
    """`ids` are distinct, hold the `logprobs` in `values` (float16), and those are the largest, in order."""
    k = ids.shape[-1]
    ordered = np.sort(ids, -1)
    assert (ordered[..., 1:] != ordered[..., :-1]).all()
    close = dict(rtol=1e-3, atol=2e-3)
    assert np.allclose(values, -np.sort(-logprobs, -1)[..., :k], **close)
    assert np.allclose(np.take_along_axis(logprobs, ids.astype(np.int64), -1), values, **close)


def _save(setup, out, **kw):
    from llmctl.core.distill.store import save_teacher_outputs

    args = {"top_k": K, "seq_len": SEQ, **kw}
    return save_teacher_outputs(setup["teacher"], setup["shards"], out, **args)


def test_the_store_holds_transformers_top_k_of_every_window_in_files_of_the_set_size(setup, tmp_path, monkeypatch):
    from llmctl.core.checkpoint import checkpoint_hash
    from llmctl.core.data.shards import TokenShards
    from llmctl.core.distill import store as store_module
    from llmctl.core.tokenizer import load_tokenizer

    monkeypatch.setattr(store_module, "FILE_BYTES", 7 * SEQ * K * 4 + 3)  # 7 windows a file (2-byte ids + float16)
    rows = _windows(setup["shards"], SEQ)
    total = len(rows)
    assert total > 30 and total % 7 and total % 3  # a short last file and a short last batch
    logprobs = _reference(setup["teacher"], rows)
    report = Recorder()
    manifest = _save(setup, tmp_path / "store", batch_size=3, report=report)

    sizes = [7] * (total // 7) + [total % 7]
    shards = TokenShards(setup["shards"])
    assert manifest == {
        "format": "llmctl-teacher-topk", "version": 1, "top_k": K, "seq_len": SEQ, "vocab_size": setup["vocab"],
        "id_dtype": "uint16", "windows": total, "tokenizer_hash": load_tokenizer(setup["teacher"]).hash,
        "teacher": {"path": str(setup["teacher"].resolve()), "hash": checkpoint_hash(setup["teacher"])},
        "data": {"path": str(setup["shards"].resolve()), "train_tokens": shards.num_tokens("train")},
        "files": [{"ids": f"ids-{n:05d}.bin", "logprobs": f"logprobs-{n:05d}.bin", "windows": w}
                  for n, w in enumerate(sizes)]}
    assert json.loads((tmp_path / "store" / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(
        ["manifest.json"] + [f"{kind}-{n:05d}.bin" for n in range(len(sizes)) for kind in ("ids", "logprobs")])
    start = 0
    for n, w in enumerate(sizes):  # each file: its windows, row-major, little-endian
        got_ids = np.fromfile(tmp_path / "store" / f"ids-{n:05d}.bin", dtype="<u2").reshape(w, SEQ, K)
        got_values = np.fromfile(tmp_path / "store" / f"logprobs-{n:05d}.bin", dtype="<f2").reshape(w, SEQ, K)
        _assert_top_k(got_ids, got_values.astype(np.float32), logprobs[start:start + w])
        start += w

    assert report.calls[0] == ("progress", "teacher top-k", total, "window")
    assert [c[1] for c in report.calls[1:]] == [{"completed": min(total, b)} for b in range(3, total + 3, 3)]


def test_lookup_returns_each_windows_top_k_across_file_boundaries_in_the_order_asked(setup, tmp_path, monkeypatch):
    from llmctl.core.distill import store as store_module
    from llmctl.core.distill.store import TeacherOutputs

    monkeypatch.setattr(store_module, "FILE_BYTES", 4 * SEQ * K * 4)  # 4 windows a file exactly
    rows = _windows(setup["shards"], SEQ)
    logprobs = _reference(setup["teacher"], rows)
    _save(setup, tmp_path / "store")
    store = TeacherOutputs(tmp_path / "store")
    assert (store.k, store.seq_len, store.windows) == (K, SEQ, len(rows))
    asked = [len(rows) - 1, 0, 4, 3, 8, 7, 5, 4]  # last, first, each side of two file starts, one twice
    got_ids, got_values = store.lookup(asked)
    assert got_ids.dtype == torch.int64 and got_values.dtype == torch.float32
    assert got_ids.shape == got_values.shape == (len(asked), SEQ, K)
    _assert_top_k(got_ids.numpy(), got_values.numpy(), logprobs[asked])


def test_a_window_larger_than_a_file_gets_a_file_of_its_own_and_a_batch_spans_files(setup, tmp_path, monkeypatch):
    from llmctl.core.distill import store as store_module

    monkeypatch.setattr(store_module, "FILE_BYTES", SEQ * K * 4 - 1)  # under one window
    from llmctl.core.distill.store import save_teacher_outputs

    manifest = save_teacher_outputs(setup["teacher"], setup["few"], tmp_path / "store", top_k=K, seq_len=SEQ,
                                    batch_size=4)
    assert manifest["windows"] > 4 and [f["windows"] for f in manifest["files"]] == [1] * manifest["windows"]
    monkeypatch.setattr(store_module, "FILE_BYTES", 7 * CONTEXT * K * 4)  # a batch of 16 spans three files
    manifest = save_teacher_outputs(setup["teacher"], setup["shards"], tmp_path / "again", top_k=K, seq_len=CONTEXT,
                                    batch_size=16)
    total = manifest["windows"]
    sizes = [7] * (total // 7) + [total % 7] * (total % 7 > 0)
    assert total > 40 and [f["windows"] for f in manifest["files"]] == sizes


def test_the_default_batch_is_eight_windows(setup, tmp_path):
    report = Recorder()
    manifest = _save(setup, tmp_path / "store", report=report)
    total = manifest["windows"]
    assert [c[1] for c in report.calls[1:]] == [{"completed": min(total, b)} for b in range(8, total + 8, 8)]
    assert [f["windows"] for f in manifest["files"]] == [total]  # far under 256 MB: one file


def _wide_teacher(out, setup, vocab):
    """A one-block transformers Llama of `vocab` tokens (the tokenizer's ids, padded) whose top token
    is always the last id."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[-1] = 0
        model.lm_head.weight[-1, 0] = 1e3
        model.model.embed_tokens.weight[:, 0] = 1.0  # every hidden state's first feature is positive …
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.model.layers[0].self_attn.o_proj.weight.zero_()  # … through the block unchanged
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(setup["teacher"] / name, out / name)
    return out


@pytest.mark.parametrize("vocab, dtype", [(1 << 16, "uint16"), ((1 << 16) + 1, "uint32")])
def test_ids_are_16_bit_up_to_65536_tokens_and_32_bit_above(setup, tmp_path, vocab, dtype):
    from llmctl.core.distill.store import TeacherOutputs, save_teacher_outputs

    teacher = _wide_teacher(tmp_path / "wide", setup, vocab)
    manifest = save_teacher_outputs(teacher, setup["few"], tmp_path / "store", top_k=2, seq_len=4)  # a few windows
    assert manifest["id_dtype"] == dtype and manifest["vocab_size"] == vocab
    itemsize = np.dtype(dtype).itemsize
    windows = manifest["windows"]
    assert (tmp_path / "store" / "ids-00000.bin").stat().st_size == windows * 4 * 2 * itemsize
    ids, values = TeacherOutputs(tmp_path / "store").lookup(np.arange(windows))
    assert bool((ids[..., 0] == vocab - 1).all())  # the largest id, not wrapped to a 16-bit one
    assert bool((values[..., 0] > -1e-3).all())


def test_top_k_and_seq_len_at_their_bounds_pass_and_past_them_are_refused(setup, tmp_path):
    v = setup["vocab"]
    for k in (0, v + 1):
        with pytest.raises(ConfigError) as info:
            _save(setup, tmp_path / "x", top_k=k)
        assert str(info.value) == f"--top-k: must be in 1…{v} (the teacher's vocabulary), got {k}"
    with pytest.raises(ConfigError) as info:
        _save(setup, tmp_path / "x", seq_len=CONTEXT + 1)
    assert str(info.value) == f"seq_len={CONTEXT + 1} exceeds the teacher's context ({CONTEXT})"
    assert not (tmp_path / "x").exists()

    rows = _windows(setup["shards"], CONTEXT)
    logprobs = _reference(setup["teacher"], rows)
    manifest = _save(setup, tmp_path / "all", top_k=v, seq_len=CONTEXT)  # the whole vocabulary, the whole context
    assert manifest["windows"] == len(rows)
    got = np.fromfile(tmp_path / "all" / "ids-00000.bin", dtype="<u2").reshape(-1, CONTEXT, v)
    values = np.fromfile(tmp_path / "all" / "logprobs-00000.bin", dtype="<f2").reshape(-1, CONTEXT, v)
    _assert_top_k(got, values.astype(np.float32), logprobs)
    assert _save(setup, tmp_path / "one", top_k=1)["top_k"] == 1


def test_an_existing_store_is_replaced_only_with_force(setup, tmp_path):
    from llmctl.core.outputs import OUTPUT_KINDS
    from llmctl.errors import OutputExistsError

    out = tmp_path / "store"
    _save(setup, out, top_k=2)
    with pytest.raises(OutputExistsError):
        _save(setup, out, top_k=3)
    assert _save(setup, out, top_k=3, force=True)["top_k"] == 3
    assert json.loads((out / "manifest.json").read_text())["top_k"] == 3

    is_store = OUTPUT_KINDS.get("teacher-outputs")
    assert is_store(out)
    for text in ('{"format": "llmctl-token-shards"}', "not json", "[1, 2]"):
        (tmp_path / "other").mkdir(exist_ok=True)
        (tmp_path / "other" / "manifest.json").write_text(text)
        assert not is_store(tmp_path / "other")
    assert not is_store(tmp_path / "empty")


def test_windows_of_gives_one_sequential_window_a_batch_by_default(setup):
    from llmctl.core.data.shards import TokenShards
    from llmctl.core.distill.store import windows_of

    rows = _windows(setup["shards"], SEQ)
    source = windows_of(TokenShards(setup["shards"]), SEQ)
    assert source.windows == len(rows)
    for i in (0, 1, 2, len(rows) - 1):
        assert torch.equal(source.batch(i)[:, :-1], rows[i:i + 1])


def test_a_bfloat16_teacher_runs_in_float32(setup, tmp_path):
    import transformers

    from llmctl.core.distill.store import TeacherOutputs

    half = tmp_path / "bf16"
    transformers.LlamaForCausalLM.from_pretrained(setup["teacher"], dtype=torch.bfloat16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(setup["teacher"] / name, half / name)
    rows = _windows(setup["few"], SEQ)
    logprobs = _reference(half, rows)  # the bfloat16 weights, computed in float32
    from llmctl.core.distill.store import save_teacher_outputs

    save_teacher_outputs(half, setup["few"], tmp_path / "store", top_k=K, seq_len=SEQ)
    ids, values = TeacherOutputs(tmp_path / "store").lookup(np.arange(len(rows)))
    _assert_top_k(ids.numpy(), values.numpy(), logprobs)


def test_shards_of_another_tokenizer_are_refused(setup, tmp_path):
    from llmctl.errors import UsageError

    shards = tmp_path / "shards"
    shutil.copytree(setup["shards"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    ours, manifest["tokenizer_hash"] = manifest["tokenizer_hash"], "0" * 16
    (shards / "manifest.json").write_text(json.dumps(manifest))
    from llmctl.core.distill.store import save_teacher_outputs

    with pytest.raises(UsageError) as info:
        save_teacher_outputs(setup["teacher"], shards, tmp_path / "store", top_k=K, seq_len=SEQ)
    assert f"encoded with tokenizer {'0' * 16}, but the tokenizer in use is {ours}" in str(info.value)
    assert not (tmp_path / "store").exists()


@pytest.fixture(scope="module")
def store(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("stored") / "store"
    _save(setup, out)
    return out


def _broken(store, tmp_path, change):
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(copy, manifest)
    if manifest is not None:
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_directory_that_is_not_a_store_is_refused(store, tmp_path):
    from llmctl.core.distill.store import TeacherOutputs

    with pytest.raises(DataError) as info:
        TeacherOutputs(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: not a teacher-outputs directory ([Errno 2]")
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DataError) as info:
        TeacherOutputs(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: not a teacher-outputs directory (Expecting property name")
    plain = f"{tmp_path}: not a teacher-outputs directory (make one with llmctl distill --save-teacher)"
    manifest = json.loads((store / "manifest.json").read_text())
    for text in ("[1]", json.dumps({**manifest, "version": 2}), json.dumps({**manifest, "format": "x"}),
                 json.dumps({k: v for k, v in manifest.items() if k != "version"})):
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(DataError) as info:
            TeacherOutputs(tmp_path)
        assert str(info.value) == plain


def test_a_missing_short_or_outside_file_is_refused(store, tmp_path):
    from llmctl.core.distill.store import TeacherOutputs

    manifest = json.loads((store / "manifest.json").read_text())
    windows = manifest["windows"]
    for key, size in (("ids", windows * SEQ * K * 2), ("logprobs", windows * SEQ * K * 2)):
        copy = _broken(store, tmp_path, lambda d, m: (d / f"{key}-00000.bin").unlink())
        with pytest.raises(DataError) as info:
            TeacherOutputs(copy)
        assert str(info.value) == f"{copy / f'{key}-00000.bin'}: missing or not {size} bytes as the manifest says"
        shutil.rmtree(copy)
        copy = _broken(store, tmp_path, lambda d, m: (d / f"{key}-00000.bin").write_bytes(
            (d / f"{key}-00000.bin").read_bytes()[:-2]))
        with pytest.raises(DataError) as info:
            TeacherOutputs(copy)
        assert str(info.value) == f"{copy / f'{key}-00000.bin'}: missing or not {size} bytes as the manifest says"
        shutil.rmtree(copy)
    copy = _broken(store, tmp_path, lambda d, m: m["files"][0].update(logprobs="../x.bin"))
    with pytest.raises(DataError) as info:
        TeacherOutputs(copy)
    assert str(info.value) == f"{copy / 'manifest.json'}: '../x.bin' points outside {copy}; refusing to read it"
    shutil.rmtree(copy)
    copy = _broken(store, tmp_path, lambda d, m: m.update(id_dtype="uint32"))  # 4-byte ids: the sizes disagree
    with pytest.raises(DataError) as info:
        TeacherOutputs(copy)
    size = windows * SEQ * K * 4
    assert str(info.value) == f"{copy / 'ids-00000.bin'}: missing or not {size} bytes as the manifest says"


def test_check_refuses_each_setting_a_run_cannot_read_and_passes_the_stores_own(setup, store):
    from llmctl.core.data.shards import TokenShards
    from llmctl.core.distill.store import TeacherOutputs

    outputs = TeacherOutputs(store)
    shards = TokenShards(setup["shards"])
    v = setup["vocab"]
    good = dict(tokenizer_hash=shards.tokenizer_hash, seq_len=SEQ, vocab_size=v, train_tokens=shards.num_tokens())
    outputs.check(**good)
    h, n = shards.tokenizer_hash, shards.num_tokens()
    for change, message in (
            ({"tokenizer_hash": "abc"}, f"teacher outputs {store} are of tokenizer {h}, the data's is abc"),
            ({"seq_len": SEQ + 1}, f"config key 'seq_len': the teacher outputs {store} hold windows of {SEQ} tokens, "
                                   f"not {SEQ + 1}"),
            ({"vocab_size": v + 1}, f"teacher outputs {store} are over {v} tokens; the student has vocab_size {v + 1}"),
            ({"train_tokens": n - 1}, f"config key 'data': {n - 1} train tokens, but the teacher outputs {store} were "
                                      f"made from {n} ({setup['shards'].resolve()})")):
        with pytest.raises(ConfigError) as info:
            outputs.check(**{**good, **change})
        assert str(info.value) == message


# -- the student from the teacher's blocks -------------------------------------------------------


def test_kept_layers_are_every_kth_block_from_the_first():
    from llmctl.core.distill.student import kept_layers

    assert kept_layers(5, 2) == [0, 2, 4]
    assert kept_layers(4, 2) == [0, 2]
    assert kept_layers(3, 1) == [0, 1, 2]
    assert kept_layers(12, 5) == [0, 5, 10]
    assert kept_layers(2, 3) == [0]


def _teacher(num_layers=11, **kw):
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, hidden_size=16, num_layers=num_layers, num_heads=2, num_kv_heads=1,
                      intermediate_size=24, max_seq_len=16, **kw)
    return build_model(cfg)


def test_the_student_is_teacher_block_i_times_k_and_the_teachers_embeddings_norm_and_head():
    from llmctl.core.distill.student import copy_teacher_layers, student_config
    from llmctl.core.model.build import build_model

    teacher = _teacher()
    for k, blocks in ((5, [0, 5, 10]), (1, list(range(11))), (4, [0, 4, 8])):
        cfg = student_config(teacher.cfg, k)
        assert cfg.num_layers == len(blocks)
        torch.manual_seed(1)
        student = build_model(cfg)
        copy_teacher_layers(teacher, student, k)
        source = teacher.state_dict()
        got = student.state_dict()
        assert all(not p.requires_grad or p.grad is None for p in student.parameters())
        for name, value in got.items():
            origin = name
            for i, b in enumerate(blocks):
                if name.startswith(f"model.layers.{i}."):
                    origin = f"model.layers.{b}." + name[len(f"model.layers.{i}."):]
            assert torch.equal(value, source[origin]), (k, name)
        assert torch.equal(got["lm_head.weight"], source["lm_head.weight"])
        x = torch.randint(0, 40, (2, 6))
        assert student(x).logits.requires_grad  # the copy left the student trainable


def test_keep_every_below_one_is_refused_and_a_pruned_teachers_sizes_follow_its_kept_blocks():
    from llmctl.core.distill.student import student_config

    teacher = _teacher(5)
    with pytest.raises(ConfigError) as info:
        student_config(teacher.cfg, 0)
    assert str(info.value) == "config key 'objective_args.keep_every': must be >= 1, got 0"
    assert student_config(teacher.cfg, 1) == teacher.cfg
    plain = student_config(teacher.cfg, 2)
    assert plain.layer_num_heads is None and plain.layer_intermediate_sizes is None and plain.num_layers == 3
    import dataclasses

    pruned = dataclasses.replace(teacher.cfg, layer_num_heads=[2, 1, 2, 1, 1], layer_num_kv_heads=[1, 1, 1, 1, 1],
                                 layer_intermediate_sizes=[24, 8, 16, 4, 12])
    cfg = student_config(pruned, 2)
    assert (cfg.num_layers, cfg.layer_num_heads, cfg.layer_num_kv_heads, cfg.layer_intermediate_sizes) == (
        3, [2, 2, 1], [1, 1, 1], [24, 16, 12])
    assert dataclasses.replace(cfg, num_layers=5, layer_num_heads=None, layer_num_kv_heads=None,
                               layer_intermediate_sizes=None) == teacher.cfg


def test_a_student_tensor_the_teacher_lacks_or_shapes_otherwise_is_refused():
    from llmctl.core.distill.student import copy_teacher_layers, student_config
    from llmctl.core.model.build import build_model

    teacher = _teacher(4)
    student = build_model(student_config(teacher.cfg, 1))
    with pytest.raises(ConfigError) as info:
        copy_teacher_layers(teacher, student, 2)  # student block 2 ← teacher block 4: none
    assert str(info.value).startswith("student_init=teacher: the teacher has no tensor model.layers.4.")
    import dataclasses

    wide = build_model(dataclasses.replace(student_config(teacher.cfg, 2), intermediate_size=32))
    with pytest.raises(ConfigError) as info:
        copy_teacher_layers(teacher, wide, 2)
    assert str(info.value) == ("student_init=teacher: the teacher has no tensor model.layers.0.mlp.gate_proj.weight "
                               "of shape [32, 16]")


def test_the_tokenizer_check_refuses_a_missing_or_different_teacher_tokenizer():
    from llmctl.core.distill.student import check_tokenizers

    check_tokenizers("t", "abc", "abc")
    with pytest.raises(ConfigError) as info:
        check_tokenizers("big", None, "abc")
    assert str(info.value) == ("objective_args.teacher: big has no tokenizer, so the student's cannot be checked "
                               "against it; copy the tokenizer that made it into the checkpoint")
    with pytest.raises(ConfigError) as info:
        check_tokenizers("big", "abc", "def")
    assert str(info.value) == ("the teacher's tokenizer (abc) is not the student's (def): distillation needs the "
                               "same token ids; encode the data with the teacher's tokenizer")
    with pytest.raises(ConfigError):
        check_tokenizers("big", "abc", None)


# -- the chunked loss's autograd function ---------------------------------------------------------


def _chunked_and_direct(rows, *, features_grad=True, params_grad=True, scale=0.3):
    """`fused_chunks` over a head's squared error (a shift used by rows 3… only, an unused tensor)
    and the same loss by plain autograd over all rows: (chunked total, parts, its grads, direct
    total, its grads, what each chunk saw: (start, grad enabled, chunk requires grad))."""
    from llmctl.core.distill.chunked import fused_chunks

    torch.manual_seed(0)
    features = torch.randn(7, 4)
    weight, shift, unused = torch.randn(3, 4), torch.randn(3), torch.randn(2)
    targets = torch.randn(7, 3)
    tensors = [features.requires_grad_(features_grad)]
    tensors += [t.requires_grad_(params_grad) for t in (weight, shift, unused)]

    def loss_of(x, start, stop):
        out = x @ weight.t()
        late = torch.arange(start, start + len(x)) >= 3
        out = out + late[:, None] * shift
        return ((out - targets[start:stop]) ** 2).sum() / 7

    seen = []

    def compute(chunk, start, stop):
        seen.append((start, torch.is_grad_enabled(), chunk.requires_grad))
        loss = loss_of(chunk, start, stop)
        return loss, torch.stack([loss.detach(), torch.tensor(float(stop - start))])

    total, parts = fused_chunks(compute, features, [weight, shift, unused], rows)
    if total.requires_grad:
        (total * scale).backward()
    chunked = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    direct = loss_of(features, 0, 7)
    if direct.requires_grad:
        (direct * scale).backward()
    return total, parts, chunked, direct, [t.grad for t in tensors], seen


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 100])
def test_chunked_gradients_are_autograds_through_the_whole_loss(rows):
    total, parts, grads, direct, reference, seen = _chunked_and_direct(rows)
    assert total.item() == pytest.approx(direct.item(), rel=1e-6)
    assert [s for s, _, _ in seen] == list(range(0, 7, rows))
    assert all(enabled and needs for _, enabled, needs in seen)
    assert parts[0].item() == pytest.approx(direct.item(), rel=1e-6) and parts[1].item() >= 7
    assert not parts.requires_grad
    for got, want in zip(grads[:3], reference[:3]):
        assert torch.allclose(got, want, atol=1e-6)
    assert grads[3] is None and reference[3] is None  # a tensor the loss never reads gets no gradient


def test_chunked_gradients_reach_the_features_alone_or_the_parameters_alone():
    _, _, grads, _, reference, _ = _chunked_and_direct(2, params_grad=False)
    assert torch.allclose(grads[0], reference[0], atol=1e-6) and grads[1:] == [None] * 3
    _, _, grads, _, reference, seen = _chunked_and_direct(2, features_grad=False)
    assert grads[0] is None and all(needs for _, _, needs in seen)
    assert torch.allclose(grads[1], reference[1], atol=1e-6) and torch.allclose(grads[2], reference[2], atol=1e-6)


def test_without_gradients_the_chunks_build_no_graph():
    total, parts, grads, direct, _, seen = _chunked_and_direct(3, features_grad=False, params_grad=False)
    assert total.item() == pytest.approx(direct.item(), rel=1e-6) and not total.requires_grad
    assert seen == [(0, False, False), (3, False, False), (6, False, False)]
    with torch.no_grad():
        total, _, _, _, _, seen = _chunked_and_direct(3)
    assert [enabled for _, enabled, _ in seen] == [False] * 3
