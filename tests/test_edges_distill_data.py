"""Edges of the distill objective and of the training batches that the parity tests miss (found
by mutation testing): the objective's loss against KL divergences computed by hand and TRL's GKD
loss, with the batch's document ids and a MoE student's balance loss; every refusal of its settings
word for word and the values at their bounds that pass; a bfloat16 teacher run in float32, the
stored outputs' vocabulary, `modules_to_save` of an adapter student."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from torch.nn import functional as F

from llmctl.errors import ConfigError
from test_train import FAST, corpus  # noqa: F401  (the shared corpus fixture)

# -- the distill objective -----------------------------------------------------------------------


def _save_model(out, *, tokenizer=None, dtype=None, seed=0, **overrides):
    """A random llmctl checkpoint (320 tokens, the corpus tokenizer's, 3 blocks of width 48)."""
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model
    from llmctl.core.model.io import save_model

    torch.manual_seed(seed)
    cfg = dict(vocab_size=320, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64,
               max_seq_len=64, initializer_range=0.2)
    model = build_model(ModelConfig(**{**cfg, **overrides}))
    if dtype is not None:
        model = model.to(dtype)
    return save_model(model, out, tokenizer_dir=tokenizer)


@pytest.fixture(scope="module")
def models(corpus, tmp_path_factory):  # noqa: F811
    """Checkpoints beside the corpus: a teacher with the corpus tokenizer (and its bfloat16 copy),
    one without a tokenizer, an encoder, and a student of another vocabulary."""
    root = tmp_path_factory.mktemp("distill-models")
    tok = corpus["tok"]
    return {
        "teacher": _save_model(root / "teacher", tokenizer=tok),
        "bf16": _save_model(root / "bf16", tokenizer=tok, dtype=torch.bfloat16),
        "bare": _save_model(root / "bare"),
        "encoder": _save_model(root / "encoder", tokenizer=tok, is_causal=False, position="learned",
                               norm="layernorm", mlp="gelu"),
        "student400": _save_model(root / "student400", vocab_size=400, hidden_size=32, num_layers=2),
    }


def _plan(corpus, *args, data=None):  # noqa: F811
    from llmctl.config import load_config
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, [f"data={data or corpus['shards']}", *FAST, "objective=distill", *args],
                      kind="train")
    return make_plan(cfg, "cpu")


def _trainer(plan, tmp_path):
    from llmctl.core.train import distributed
    from llmctl.core.train.loop import Trainer

    (tmp_path / "run").mkdir()
    return Trainer(plan, tmp_path / "run", torch.device("cpu"), distributed.Dist(), {})


def _refused(corpus, message, *args, data=None):  # noqa: F811
    with pytest.raises(ConfigError) as info:
        _plan(corpus, *args, data=data)
    assert str(info.value) == message


def _kl(p_logits, q_logits, T):
    """KL(p ‖ q) of the distributions at temperature T, per position."""
    return F.kl_div(F.log_softmax(q_logits / T, -1), F.log_softmax(p_logits / T, -1), log_target=True,
                    reduction="none").sum(-1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_objective_loss_is_the_weighted_divergences_of_both_models_with_the_moe_balance_loss(corpus, models,  # noqa: F811
                                                                                             tmp_path):
    """A MoE student under document_mask: the objective's loss is T²·KL(teacher ‖ student) and
    T²·KL(student ‖ teacher) (torch's kl_div), TRL's GKD loss × T², the student's cross-entropy,
    weighted, plus the student's balance loss; both models see the batch's document ids."""
    from trl.experimental.gkd import GKDTrainer

    (tmp_path / "moe.yaml").write_text("hidden_size: 32\nnum_layers: 2\nnum_heads: 2\nmax_seq_len: 64\n"
                                       "num_experts: 4\nexperts_per_token: 2\n")
    T, beta = 2.5, 0.3
    weights = {"forward_kl": 0.5, "reverse_kl": 0.2, "jsd": 0.4, "ce": 0.3}
    losses = "{" + ", ".join(f"{k}: {v}" for k, v in weights.items()) + "}"
    plan = _plan(corpus, f"model={tmp_path / 'moe.yaml'}", "document_mask=true", f"objective_args.teacher="
                 f"{models['teacher']}", f"objective_args.losses={losses}", f"objective_args.temperature={T}",
                 f"objective_args.beta={beta}", "objective_args.chunk_rows=7")
    trainer = _trainer(plan, tmp_path)
    objective, student, teacher = trainer.objective, trainer.model, trainer.objective.teacher
    assert objective.criterion.chunk_rows == 7
    eos = plan.model_config.eos_token_id
    rows = torch.randint(3, 300, (2, 33), generator=torch.Generator().manual_seed(0))
    rows[0, [5, 17]] = rows[1, 9] = eos
    inputs, labels, extra = trainer._inputs(rows, 0)
    assert set(extra) == {"document_ids"}
    total, ce = objective.loss(trainer.forward, inputs, labels, extra)

    with torch.no_grad():
        out = student(inputs, **extra)
        s, t = out.logits, teacher(inputs, **extra).logits
        parts = {"forward_kl": T * T * _kl(t, s, T).mean(), "reverse_kl": T * T * _kl(s, t, T).mean(),
                 "jsd": T * T * GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=T),
                 "ce": F.cross_entropy(s.flatten(0, 1), labels.flatten())}
        expected = sum(w * parts[k] for k, w in weights.items()) + out.aux_loss
        alone = sum(w * parts[k] for k, w in weights.items())
        whole = student(inputs).logits  # guard: the document ids change the logits
    assert out.aux_loss > 1e-3 and not torch.allclose(whole, s, atol=1e-3)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() != pytest.approx(alone.item(), rel=1e-5)
    assert ce.item() == pytest.approx(parts["ce"].item(), rel=1e-5)


def test_the_teacher_runs_in_float32_on_the_objectives_device(corpus, models, tmp_path):  # noqa: F811
    plan = _plan(corpus, "model=nano", f"objective_args.teacher={models['bf16']}")
    trainer = _trainer(plan, tmp_path)
    params = list(trainer.objective.teacher.parameters())
    assert {p.dtype for p in params} == {torch.float32} and {p.device.type for p in params} == {"cpu"}


def test_an_adapter_students_modules_to_save_train_in_full(corpus, models, tmp_path):  # noqa: F811
    plan = _plan(corpus, "model=nano", f"objective_args.teacher={models['teacher']}", "objective_args.adapter=lora",
                 "objective_args.lora={r: 2, target_modules: [q_proj], modules_to_save: [lm_head]}",
                 "model_args={tie_embeddings: false}")
    model = _trainer(plan, tmp_path).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.weight" in trainable and "model.embed_tokens.weight" not in trainable
    assert {n for n in trainable if n != "lm_head.weight"} and all(".lora_" in n for n in trainable
                                                                   if n != "lm_head.weight")


def test_a_preset_student_takes_the_teachers_vocabulary(corpus, models):  # noqa: F811
    """The data's tokenizer has 320 tokens; a preset asked for 400 gets the teacher's 320; a
    checkpoint of 400 is refused."""
    plan = _plan(corpus, "model=nano", "model_args={vocab_size: 400}", f"objective_args.teacher={models['teacher']}")
    assert plan.model_config.vocab_size == 320 and plan.parents == [str(models["teacher"])]
    _refused(corpus, "the student's vocab_size (400) is not the teacher's (320); their logits must line up",
             f"model={models['student400']}", f"objective_args.teacher={models['teacher']}")


def test_settings_at_their_bounds_pass(corpus, models):  # noqa: F811
    """A zero weight beside a positive one; temperature below 1; beta 0 and 1; seq_len equal to
    the teacher's context; layer-map pairs from 0 up to each model's number of blocks."""
    teacher = f"objective_args.teacher={models['teacher']}"
    for args in (["objective_args.losses={forward_kl: 0, ce: 1}", "objective_args.temperature=0.5",
                  "objective_args.beta=0"],
                 ["objective_args.beta=1", "seq_len=64", "objective_args.layer_map=[[0, 0], [2, 3]]"]):
        plan = _plan(corpus, "model=nano", "model_args={num_layers: 2}", teacher, *args)
        assert plan.config.objective == "distill"


def _message(template: str, **paths) -> str:
    for name, path in paths.items():
        template = template.replace("{" + name + "}", str(path))
    return template


REFUSALS = [  # (arguments, the message); {teacher} etc. name the checkpoints of `models`
    ([], "objective_args: give the teacher checkpoint (teacher) or its stored outputs (teacher_outputs), one of them"),
    (["objective_args.teacher={teacher}", "objective_args.teacher_outputs={teacher}"],
     "objective_args: give the teacher checkpoint (teacher) or its stored outputs (teacher_outputs), one of them"),
    (["objective_args.teacher={teacher}", "objective_args.lora={r: 2}"],
     "config key 'objective_args.lora': set objective_args.adapter=lora to train adapters"),
    (["objective_args.teacher={teacher}", "objective_args.adapter=lora", "objective_args.lora={rank: 2}"],
     "config key 'objective_args.lora': LoRA.__init__() got an unexpected keyword argument 'rank'"),
    (["objective_args.teacher={teacher}", "objective_args.losses={}"],
     "config key 'objective_args.losses': name: weight pairs, weights >= 0, one > 0; got {}"),
    (["objective_args.teacher={teacher}", "objective_args.losses={forward_kl: -1, ce: 1}"],
     "config key 'objective_args.losses': name: weight pairs, weights >= 0, one > 0; got "
     "{'forward_kl': -1, 'ce': 1}"),
    (["objective_args.teacher={teacher}", "objective_args.losses={forward_kl: 0, ce: 0}"],
     "config key 'objective_args.losses': name: weight pairs, weights >= 0, one > 0; got "
     "{'forward_kl': 0, 'ce': 0}"),
    (["objective_args.teacher_outputs={teacher}", "objective_args.losses={ce: 1, hidden_mse: 1}"],
     "objective_args.losses: hidden_mse matches hidden states, which need the teacher online "
     "(objective_args.teacher), not stored outputs"),
    (["objective_args.teacher={teacher}", "objective_args.temperature=0"],
     "objective_args: temperature must be > 0 and beta in [0, 1], got 0.0, 0.5"),
    (["objective_args.teacher={teacher}", "objective_args.beta=1.5"],
     "objective_args: temperature must be > 0 and beta in [0, 1], got 2.0, 1.5"),
    (["objective_args.teacher={teacher}", "objective_args.beta=-0.5"],
     "objective_args: temperature must be > 0 and beta in [0, 1], got 2.0, -0.5"),
    (["objective_args.teacher={bare}"],
     "objective_args.teacher: {bare} has no tokenizer, so the student's cannot be checked against it; copy the "
     "tokenizer that made it into the checkpoint"),
    (["objective_args.teacher={encoder}"], "objective_args.teacher: {encoder} is encoder-only; distill trains causal "
                                           "students"),
    (["objective_args.teacher={teacher}", "objective_args.student_init=teacher", "model={student400}"],
     "objective_args.student_init=teacher builds the student from the teacher's blocks; leave out "
     "model={student400}"),
    (["objective_args.teacher={teacher}", "seq_len=65"],
     "config key 'seq_len': 65 exceeds the teacher's context (64)"),
    (["objective_args.teacher={teacher}", "objective_args.layer_map=[[0, 4]]"],
     "config key 'objective_args.layer_map': [0, 4] is out of range (student 0…2, teacher 0…3)"),
    (["objective_args.teacher={teacher}", "objective_args.layer_map=[[3, 0]]"],
     "config key 'objective_args.layer_map': [3, 0] is out of range (student 0…2, teacher 0…3)"),
    (["objective_args.teacher_outputs={teacher}", "objective_args.student_init=teacher"],
     "objective_args.student_init=teacher needs the teacher checkpoint (objective_args.teacher)"),
    (["objective_args.teacher_outputs={teacher}"],  # random windows (the default sampling)
     "objective_args.teacher_outputs: stored teacher outputs are per window of token shards; train on the "
     "shards they were made from with sampling=sequential"),
]


@pytest.mark.parametrize("args,message", REFUSALS, ids=range(len(REFUSALS)))
def test_each_refusal_names_the_problem(corpus, models, args, message):  # noqa: F811
    student = [] if any("model=" in a for a in args) else ["model=nano", "model_args={num_layers: 2}"]
    _refused(corpus, _message(message, **models), *student, *[_message(a, **models) for a in args])


def test_refusals_of_a_teacher_that_does_not_load_and_of_a_bad_store(corpus, tmp_path):  # noqa: F811
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"^config key 'objective_args.teacher': .*{re.escape(str(empty))}"):
        _plan(corpus, "model=nano", f"objective_args.teacher={empty}")
    _refused(corpus, f"config key 'objective_args.teacher_outputs': {missing}: not a teacher-outputs directory "
                     f"([Errno 2] No such file or directory: '{missing / 'manifest.json'}')",
             "model=nano", f"objective_args.teacher_outputs={missing}", "sampling=sequential")


def test_stored_outputs_need_token_shards_and_give_a_preset_their_vocabulary(corpus, models, tmp_path):  # noqa: F811
    from llmctl.core.data import Corpus, encode_corpus
    from llmctl.core.distill.store import save_teacher_outputs
    from llmctl.core.tokenizer import load_tokenizer
    from test_train import TEXT

    (tmp_path / "part.txt").write_text(TEXT[:6000], encoding="utf-8")  # a store of a few dozen windows
    shards, store = tmp_path / "shards", tmp_path / "store"
    shards.mkdir()
    encode_corpus(Corpus([str(tmp_path / "part.txt")]), load_tokenizer(corpus["tok"]), shards, val_fraction=0.1)
    save_teacher_outputs(models["teacher"], shards, store, top_k=4, seq_len=32)
    plan = _plan(corpus, "model=nano", "model_args={vocab_size: 400}", f"objective_args.teacher_outputs={store}",
                 "sampling=sequential", data=shards)
    assert plan.model_config.vocab_size == 320
    _refused(corpus, "objective_args.teacher_outputs: stored teacher outputs are per window of token shards; train "
                     "on the shards they were made from with sampling=sequential",
             "model=nano", f"tokenizer={corpus['tok']}", f"objective_args.teacher_outputs={store}",
             "sampling=sequential", data=tmp_path / "part.txt")


def test_shards_without_their_tokenizer_are_refused_against_the_teachers(corpus, models, tmp_path):  # noqa: F811
    """Shards whose tokenizer copy is gone give the plan no tokenizer: the teacher's cannot match."""
    from llmctl.core.tokenizer import load_tokenizer

    shards = shutil.copytree(corpus["shards"], tmp_path / "shards")
    shutil.rmtree(shards / "tokenizer")
    _refused(corpus, f"the teacher's tokenizer ({load_tokenizer(models['teacher']).hash}) is not the student's "
                     "(None): distillation needs the same token ids; encode the data with the teacher's tokenizer",
             "model=nano", f"objective_args.teacher={models['teacher']}", data=shards)


# -- training batches from token shards --------------------------------------------------------

SEQ = 4


def _shards(*lengths, start=0):
    """uint16 arrays of those lengths holding consecutive ids (each token tells where it came from)."""
    import numpy as np

    out = []
    for n in lengths:
        out.append(np.arange(start, start + n, dtype=np.uint16))
        start += n
    return out


def _window(arrays, number, stride, count):
    """The tokens of window `number` of the arrays' stream of windows: `count(a)` windows per array,
    window k of an array starting at k·stride (a transcription of the docstring, array by array)."""
    for a in arrays:
        if number < count(a):
            return a[number * stride:number * stride + SEQ + 1].astype("int64")
        number -= count(a)
    raise AssertionError("past the last window")


def _reference_rows(arrays, *, sampling, seed, index, rows, first):
    """Rows `first`… of global micro-batch `index` (`rows` of them in all) as the module docstring
    defines them: random starts drawn by numpy's generator seeded with (seed, index) over every start
    with a full window, or sequential windows at stride SEQ, round and round the train stream."""
    import numpy as np

    if sampling == "random":
        starts = np.random.default_rng([seed, index]).integers(0, sum(len(a) - SEQ for a in arrays), size=rows)
        picked = [_window(arrays, int(s), 1, lambda a: len(a) - SEQ) for s in starts]
    else:
        total = sum((len(a) - 1) // SEQ for a in arrays)
        picked = [_window(arrays, (index * rows + i) % total, SEQ, lambda a: (len(a) - 1) // SEQ)
                  for i in range(rows)]
    return torch.tensor(np.stack(picked[first:]))


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_shard_batches_are_the_documented_windows_of_every_shard(sampling):
    """Train shards of 4 (= seq_len: dropped), 11, 5, 13 and 9 tokens, val shards of 11, 4, 9 and 5;
    two ranks of two rows: each rank's rows of micro-batches 0…8 (past the end of the 8 sequential
    windows) and the validation windows."""
    from llmctl.core.train.data import ShardBatches

    train, val = _shards(4, 11, 5, 13, 9), _shards(11, 4, 9, 5, start=100)
    kept = train[1:]
    for rank in range(2):
        data = ShardBatches(train, val, seq_len=SEQ, batch_size=2, seed=7, sampling=sampling, rank=rank, world=2,
                            eval_batches=100)
        assert data.windows == 2 + 1 + 3 + 2
        assert data.state() == {"kind": "shards", "index": 0}
        for index in range(9):
            expected = _reference_rows(kept, sampling=sampling, seed=7, index=index, rows=4, first=2 * rank)[:2]
            assert torch.equal(data.batch(index), expected), (rank, index)
            assert data.state() == {"kind": "shards", "index": index + 1}
        # validation: the first windows of the val split (2 + 2 + 1 = 5 of them: one batch of 4 rows)
        (batch,) = data.val_batches()
        expected = _reference_rows([val[0], val[2], val[3]], sampling="sequential", seed=0, index=0, rows=4,
                                   first=2 * rank)[:2]
        assert torch.equal(batch, expected)
        data.load_state({"kind": "shards", "index": 5})
        assert data.state() == {"kind": "shards", "index": 5}
    one = ShardBatches(train, val, seq_len=SEQ, batch_size=1, seed=7, sampling=sampling, eval_batches=4)
    assert len(one.val_batches()) == 4


def test_shard_batches_refuse_a_train_split_of_short_streams():
    from llmctl.core.train.data import ShardBatches
    from llmctl.errors import DataError

    with pytest.raises(DataError, match=r"^the train split has no document stream longer than seq_len=4 tokens$"):
        ShardBatches(_shards(4, 3), _shards(9), seq_len=SEQ, batch_size=1, seed=0, sampling="random")


# -- training batches from raw text --------------------------------------------------------------

EOS = 1
A_TEXT = "a first line of thirty-two bytes\n" + "".join(f"line {i}: {'word ' * (i % 5)}\n" for i in range(12))
B_TEXT = "a last file\nwithout a final newline"


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.fixture
def texts(tmp_path, monkeypatch):
    """Two text files, 32-byte blocks, and a character-level encoder that records the blocks."""
    from llmctl.core.train import data

    monkeypatch.setattr(data, "BLOCK_BYTES", 32)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(A_TEXT, encoding="utf-8")
    b.write_text(B_TEXT, encoding="utf-8")
    blocks = []
    return a, b, blocks, lambda s: blocks.append(s) or _ids(s)


def _text_windows(ids: list[int], first: int, count: int, seq: int = 8) -> list[list[int]]:
    """Windows `first`… of seq + 1 tokens at stride seq over the stream repeated (epochs)."""
    cycle = ids * (2 + (first + count) * seq // len(ids))
    return [cycle[w * seq:w * seq + seq + 1] for w in range(first, first + count)]


def test_text_stream_rows_are_the_texts_windows_round_and_round_with_eos_between_files(texts):
    """Three epochs of rows equal the windows of a + EOS + b + EOS repeated; each block is cut at the
    first newline at or past 32 bytes (or its file's end); a stream resumed at any row's position goes
    on the same; without an EOS id the files simply follow each other."""
    import json

    from llmctl.core.train.data import TextStream, split_text

    a, b, blocks, encode = texts
    segments, val = split_text([a, b], 0.0)
    assert (segments, val) == ([(a, 0, len(A_TEXT)), (b, 0, len(B_TEXT))], [])
    stream = TextStream(segments, encode, EOS, 8)
    reference = _ids(A_TEXT) + [EOS] + _ids(B_TEXT) + [EOS]
    count = 3 * len(reference) // 8
    positions, rows = [], []
    for _ in range(count):
        positions.append(stream.position())
        rows.append(stream.next_row().tolist())
    assert rows == _text_windows(reference, 0, count)
    assert positions[0] == {"epoch": 0, "segment": 0, "byte": 0, "skip": 0}
    assert [p["epoch"] for p in positions] == [k * 8 // len(reference) for k in range(count)]  # the row's pass
    a_blocks = blocks[:next(i for i in range(len(blocks)) if "".join(blocks[:i + 1]) == A_TEXT) + 1]
    assert len(a_blocks) > 3 and blocks[len(a_blocks)] == B_TEXT  # 35 bytes, no newline after the 32nd
    for block in a_blocks[:-1]:  # the last one ends with the file
        assert block.endswith("\n") and len(block) >= 32 and "\n" not in block[31:-1], block

    for at in range(count - 2):
        resumed = TextStream(segments, encode, EOS, 8)
        resumed.seek(json.loads(json.dumps(positions[at])))
        assert [resumed.next_row().tolist() for _ in range(2)] == rows[at:at + 2], at

    plain = TextStream(segments, encode, None, 8)
    assert [plain.next_row().tolist() for _ in range(20)] == _text_windows(_ids(A_TEXT) + _ids(B_TEXT), 0, 20)


def test_text_stream_fills_a_row_from_two_passes_at_most(tmp_path):
    """5 tokens a pass (4 + EOS) fill a row of 10 from exactly two passes; 3 tokens a pass would
    need three passes to fill a row of 9: refused."""
    from llmctl.core.train.data import TextStream
    from llmctl.errors import DataError

    (tmp_path / "t.txt").write_text("abcd", encoding="utf-8")
    stream = TextStream([(tmp_path / "t.txt", 0, 4)], _ids, EOS, 9)
    assert stream.next_row().tolist() == (_ids("abcd") + [EOS]) * 2
    (tmp_path / "t.txt").write_text("ab", encoding="utf-8")
    stream = TextStream([(tmp_path / "t.txt", 0, 2)], _ids, EOS, 8)
    with pytest.raises(DataError, match=r"^the text data holds fewer than seq_len\+1=9 tokens$"):
        stream.next_row()


def test_text_stream_reads_only_its_segment_and_decodes_bad_bytes_as_replacements(texts, tmp_path):
    """A train part that ends inside a file stops there, and the held-out part starts there (each
    equal to the windows of its own text), as does a byte range that ends inside a line; bytes that are not UTF-8 become U+FFFD; a block that the
    tokenizer encodes to nothing leaves the rows int64."""
    import numpy as np

    from llmctl.core.train.data import TextStream, split_text

    a, _, _, encode = texts
    train, val = split_text([a], 0.5)
    (_, _, cut), = train
    assert 0 < cut < len(A_TEXT) and A_TEXT[cut - 1] == "\n" and val == [(a, cut, len(A_TEXT))]
    mid_line = [(a, 0, 40)]  # ends 7 bytes into a line, after a first block of 33 bytes
    for segments, text in ((train, A_TEXT[:cut]), (val, A_TEXT[cut:]), (mid_line, A_TEXT[:40])):  # two passes
        stream = TextStream(segments, encode, EOS, 8)
        reference = _ids(text) + [EOS]
        count = 2 * len(reference) // 8
        assert [stream.next_row().tolist() for _ in range(count)] == _text_windows(reference, 0, count)

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe then text\n")
    stream = TextStream([(bad, 0, bad.stat().st_size)], _ids, EOS, 8)
    assert stream.next_row().tolist() == _ids("ok \ufffd\ufffd the")

    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\n" * 40 + b"some words\n")  # a first block of 40 newlines, encoded to nothing
    stream = TextStream([(blank, 0, 51)], lambda s: _ids(s.strip()), EOS, 8)
    row = stream.next_row()
    assert row.dtype == np.int64 and row.tolist() == _ids("some word")


def test_text_batches_slice_the_global_batch_per_rank_resume_and_validate_one_pass(texts):
    """Two ranks of two rows: rank r takes rows 2r, 2r + 1 of each global batch of 4 windows; the
    state resumes a fresh source at the next batch; batches are asked for in order; validation
    takes at most `eval_batches` batches that start within its text's first pass."""
    import json

    from llmctl.core.train.data import TextBatches, TextStream

    a, b, _, encode = texts
    train = [(a, 0, len(A_TEXT))]
    reference = _ids(A_TEXT) + [EOS]
    val_text = _ids(B_TEXT) + [EOS]  # 36 tokens: windows start at 0, 8, …, 32 in the first pass

    def source(rank, eval_batches=10, world=2, val=True):
        return TextBatches(TextStream(train, encode, EOS, 8), TextStream([(b, 0, len(B_TEXT))], encode, EOS, 8)
                           if val else None, batch_size=2, rank=rank, world=world, eval_batches=eval_batches)

    for rank in range(2):
        data = source(rank)
        for index in range(5):
            assert data.batch(index).tolist() == _text_windows(reference, 4 * index + 2 * rank, 2), (rank, index)
        state = json.loads(json.dumps(data.state()))
        assert state["kind"] == "text" and state["index"] == 5
        resumed = source(rank)
        resumed.load_state(state)
        assert resumed.batch(5).tolist() == data.batch(5).tolist()
        with pytest.raises(RuntimeError, match=r"^text batches are sequential: asked for 7, next is 6$"):
            data.batch(7)
        # validation: global batches of 4 windows starting at tokens 0 and 32; the next would start at
        # 64, in the second pass
        assert [x.tolist() for x in data.val_batches()] == [_text_windows(val_text, 2 * rank + 4 * i, 2)
                                                            for i in range(2)]
        assert data.val_batches() == []  # drawn once; the caller keeps it
    for eval_batches, count in ((10, 3), (2, 2)):  # batches of 2 windows start at 0, 16, 32 (48: second pass)
        one = source(0, eval_batches=eval_batches, world=1)
        assert [x.tolist() for x in one.val_batches()] == [_text_windows(val_text, 2 * i, 2) for i in range(count)]
    assert source(0, eval_batches=3, world=1, val=False).val_batches() == []


def test_text_validation_too_short_for_a_row_gives_no_batches(texts, tmp_path):
    """Validation text of 3 tokens (with its EOS): two passes cannot fill a row of 9, so the stream
    refuses it and there is no evaluation (the training stream would stop the run)."""
    from llmctl.core.train.data import TextBatches, TextStream

    a, _, _, encode = texts
    (tmp_path / "short.txt").write_text("ab", encoding="utf-8")
    data = TextBatches(TextStream([(a, 0, len(A_TEXT))], encode, EOS, 8),
                       TextStream([(tmp_path / "short.txt", 0, 2)], encode, EOS, 8), batch_size=1, eval_batches=2)
    assert data.val_batches() == []


def test_split_text_holds_out_the_last_fraction_cut_after_a_newline(tmp_path, monkeypatch):
    """Files a (120 B), an empty one, b (80 B): a quarter held out cuts b after the newline at or
    past byte 150; holding out everything leaves no training text; a line without a newline in the
    64 KiB after the cut is cut there; empty data is refused."""
    from llmctl.core.train import data
    from llmctl.core.train.data import TextStream, split_text
    from llmctl.errors import DataError

    a, empty, b = tmp_path / "a.txt", tmp_path / "empty.txt", tmp_path / "b.txt"
    a.write_bytes(b"x" * 59 + b"\n" + b"y" * 59 + b"\n")
    empty.write_bytes(b"")
    b.write_bytes(b"z" * 19 + b"\n" + b"w" * 39 + b"\n" + b"v" * 19 + b"\n")
    assert split_text([a, empty, b], 0.25) == ([(a, 0, 120), (b, 0, 60)], [(b, 60, 80)])
    assert split_text([a, empty, b], 0.5) == ([(a, 0, 120)], [(b, 0, 80)])  # the cut at b's start
    assert split_text([a, empty, b], 0.0) == ([(a, 0, 120), (b, 0, 80)], [])
    assert split_text([a, b], 0.45) == ([(a, 0, 120)], [(b, 0, 80)])  # 110 → a's end
    assert split_text([a, b], 0.75) == ([(a, 0, 60)], [(a, 60, 120), (b, 0, 80)])  # 50 → 60
    assert split_text([a, b, a], 0.25) == ([(a, 0, 120), (b, 0, 80), (a, 0, 60)], [(a, 60, 120)])  # 240 → 260
    with pytest.raises(DataError, match=r"^no training text left after holding out the validation part$"):
        split_text([a, b], 1.0)

    long = tmp_path / "long.txt"
    long.write_bytes(b"q" * 180_000 + b"\n" + b"r" * 19_999 + b"\n")  # 200 kB, a newline at 180,000
    cut = 100_000 + (1 << 16)
    assert split_text([long], 0.5) == ([(long, 0, cut)], [(long, cut, 200_001)])
    assert split_text([long], 0.2) == ([(long, 0, 180_001)], [(long, 180_001, 200_001)])
    # the train part ends inside the long line: a 32-byte block grows towards the next newline, in
    # reads of 4 kB, but not past the part
    monkeypatch.setattr(data, "BLOCK_BYTES", 32)
    stream = TextStream([(long, 10, cut)], lambda s: [len(s)], EOS, 2)
    assert stream.next_row().tolist() == [cut - 10, EOS, cut - 10]

    one = tmp_path / "one.txt"
    one.write_bytes(b"x")
    assert split_text([one], 0.0) == ([(one, 0, 1)], [])
    with pytest.raises(DataError, match=rf"^the text data {re.escape(str(empty))}, {re.escape(str(empty))} is empty$"):
        split_text([empty, empty], 0.1)
