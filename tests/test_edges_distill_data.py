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
    (["objective_args.teacher={teacher}", "distributed.strategy=fsdp"],
     "config key 'distributed.strategy': distill runs the student's head outside its forward, which FSDP does "
     "not allow; use ddp"),
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
    from llmctl.core.distill.store import save_teacher_outputs

    store = tmp_path / "store"
    save_teacher_outputs(models["teacher"], corpus["shards"], store, top_k=4, seq_len=32)
    plan = _plan(corpus, "model=nano", "model_args={vocab_size: 400}", f"objective_args.teacher_outputs={store}",
                 "sampling=sequential")
    assert plan.model_config.vocab_size == 320
    _refused(corpus, "objective_args.teacher_outputs: stored teacher outputs are per window of token shards; train "
                     "on the shards they were made from with sampling=sequential",
             "model=nano", f"tokenizer={corpus['tok']}", f"objective_args.teacher_outputs={store}",
             "sampling=sequential", data=corpus["text"])


def test_shards_without_their_tokenizer_are_refused_against_the_teachers(corpus, models, tmp_path):  # noqa: F811
    """Shards whose tokenizer copy is gone give the plan no tokenizer: the teacher's cannot match."""
    from llmctl.core.tokenizer import load_tokenizer

    shards = shutil.copytree(corpus["shards"], tmp_path / "shards")
    shutil.rmtree(shards / "tokenizer")
    _refused(corpus, f"the teacher's tokenizer ({load_tokenizer(models['teacher']).hash}) is not the student's "
                     "(None): distillation needs the same token ids; encode the data with the teacher's tokenizer",
             "model=nano", f"objective_args.teacher={models['teacher']}", data=shards)
