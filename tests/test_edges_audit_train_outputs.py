"""Audit fixes around training outputs: a run that fails before its first checkpoint leaves
nothing that blocks its re-run; an adapter works as a distillation teacher; a finetune's chat
template goes out with its adapter (and OUT/merged); the merge short form refuses parameters
its method does not take; merge refuses quantized inputs up front."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_llama  # noqa: E402
from test_train import FAST, corpus  # noqa: E402, F401  (the shared corpus fixture)

TRAIN = [*FAST, "max_steps=2", "save_every=0", "eval_every=0"]


# -- 1. a failed start leaves nothing behind ------------------------------------------------------


def _fail_in_trainer(monkeypatch):
    from llmctl.core.train import loop
    from llmctl.errors import CheckpointError

    def broken(self, *args, **kwargs):
        raise CheckpointError("no config.json (not a model checkpoint directory)")

    monkeypatch.setattr(loop.Trainer, "__init__", broken)


def test_a_run_that_fails_when_its_trainer_is_built_leaves_no_outdir(llmctl, corpus, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "runs" / "out"
    with monkeypatch.context() as m:
        _fail_in_trainer(m)
        r = llmctl("train", f"data={corpus['shards']}", "model=micro", *TRAIN, "-o", out)
    assert r.code == 1 and "no config.json" in r.stderr
    assert not out.exists()
    assert list((tmp_path / "runs").iterdir()) == []  # nor its lock or temporaries
    r = llmctl("train", f"data={corpus['shards']}", "model=micro", *TRAIN, "-o", out)  # the re-run is not refused
    assert r.code == 0, r.stderr
    assert (out / "config.json").is_file()


def test_a_failed_start_in_an_empty_user_dir_keeps_the_dir_empty(llmctl, corpus, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "mine"
    out.mkdir()
    with monkeypatch.context() as m:
        _fail_in_trainer(m)
        r = llmctl("--force", "train", f"data={corpus['shards']}", "model=micro", *TRAIN, "-o", out)
    assert r.code == 1
    assert out.is_dir() and list(out.iterdir()) == []  # the user's directory stays, as it was


def test_a_failed_resume_keeps_the_run(llmctl, corpus, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    r = llmctl("train", f"data={corpus['shards']}", "model=micro", *TRAIN, "-o", out)
    assert r.code == 0, r.stderr
    before = sorted(p.name for p in out.iterdir())
    with monkeypatch.context() as m:
        _fail_in_trainer(m)
        r = llmctl("train", f"data={corpus['shards']}", "model=micro", *TRAIN, "max_steps=4", "--resume", "-o", out)
    assert r.code == 1
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "checkpoints" / "step-000002").is_dir()


# -- 2. an adapter as the distillation teacher ----------------------------------------------------


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):  # noqa: F811
    from llmctl.cli import main

    out = tmp_path_factory.mktemp("teacher") / "teacher"
    assert main(["--quiet", "train", f"data={corpus['shards']}", "model=micro", *TRAIN, "-o", str(out)]) == 0
    return out


def _lora_adapter(base, out, *, tokenizer: bool):
    from llmctl.core.adapters import LoRA, save_adapter
    from llmctl.core.adapters.lora import lora_modules
    from llmctl.core.model.io import load_model

    model, _ = load_model(base, dtype=torch.float32, transforms=[LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
    torch.manual_seed(0)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.5)  # a delta that changes the teacher's logits
    save_adapter(model, out, base=base, tokenizer_dir=base if tokenizer else None)
    return out


@pytest.mark.parametrize("tokenizer", [True, False], ids=["with-tokenizer", "base-tokenizer"])
def test_an_adapter_teacher_distils_as_its_merged_model(llmctl, corpus, teacher, tmp_path, tokenizer):  # noqa: F811
    adapter = _lora_adapter(teacher, tmp_path / "adapter", tokenizer=tokenizer)
    out = tmp_path / "student"
    r = llmctl("distill", "--teacher", adapter, "--student", "micro", "--data", corpus["shards"], *TRAIN, "-o", out)
    assert r.code == 0, r.stderr
    from llmctl.core.adapters import lineage_hash
    from llmctl.core.checkpoint import checkpoint_hash
    from llmctl.core.distill.objective import load_teacher
    from llmctl.core.model.io import load_model

    lineage = json.loads((out / "llmctl.json").read_text())
    [parent] = [p for p in lineage["parents"] if p["path"] == str(adapter.resolve())]
    assert parent["hash"] == lineage_hash(adapter) != checkpoint_hash(teacher)

    # the teacher it ran is the adapter's merged model: the adapter's logits, not the base's
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    merged = load_teacher(str(adapter), "cpu")
    adapted = load_model(adapter, dtype=torch.float32)[0]
    plain = load_model(teacher, dtype=torch.float32)[0]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, plain(ids).logits, atol=1e-2)
    assert not any(type(t).__name__ == "LoRA" for t in getattr(merged, "transforms", []))


def test_an_adapter_teacher_can_store_its_outputs(llmctl, corpus, teacher, tmp_path):  # noqa: F811
    adapter = _lora_adapter(teacher, tmp_path / "adapter", tokenizer=True)
    store = tmp_path / "store"
    r = llmctl("distill", "--teacher", adapter, "--data", corpus["shards"], "--save-teacher", store, "--top-k", 4,
               "seq_len=32", "batch_size=2")
    assert r.code == 0, r.stderr
    from llmctl.core.adapters import lineage_hash

    assert json.loads((store / "manifest.json").read_text())["teacher"]["hash"] == lineage_hash(adapter)


# -- 3. the chat template goes out with the finetune ----------------------------------------------

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-base")
    return tiny_llama(out, ["user: what is two plus three? assistant: five.\n" * 20], vocab=200, context=128, scale=2.0)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    with path.open("w") as f:
        for a in range(10):
            for b in range(2):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                                 {"role": "assistant", "content": f"{a + b}."}]}) + "\n")
    return path


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_finetunes_chat_template_is_saved_with_its_output(llmctl, chat_base, chats, tmp_path, method):
    from llmctl.core.tokenizer import load_tokenizer

    assert load_tokenizer(chat_base).chat_template is None  # the base has none
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    out = tmp_path / "out"
    extra = ["merge_adapter=true"] if method == "lora" else []
    r = llmctl("finetune", chat_base, "--config", "tiny", f"method={method}", "--data", chats,
               f"chat_template={template}", "max_steps=2", *extra, "-o", out)
    assert r.code == 0, r.stderr
    written = [out, *sorted((out / "checkpoints").glob("step-*"))] + ([out / "merged"] if method == "lora" else [])
    for directory in written:
        tok = load_tokenizer(directory)
        assert tok.chat_template == TEMPLATE, directory
        assert "user: hi\nassistant:" in tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert load_tokenizer(chat_base).chat_template is None  # the base's files are never written


# -- 4. the merge short form refuses what its method does not take --------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a, b = root / "a", root / "b"
    a.mkdir(), b.mkdir()
    tiny_llama(a, ["one two three four"] * 10, vocab=120, context=64)
    tiny_llama(b, ["one two three four"] * 10, vocab=120, context=64, scale=4.0)
    return a, b


@pytest.mark.parametrize("args, message", [
    (["-w", "1", "-w", "1", "-p", "normalise=false"], "--param normalise: merge method linear has no parameter "
                                                     "'normalise' (did you mean 'normalize'?)"),
    (["--method", "ties", "-p", "densty=0.2"], "--param densty: merge method ties has no parameter 'densty' "
                                               "(did you mean 'density'?)"),
    (["--density", "0.5"], "--density: merge method linear has no parameter 'density'"),
    (["--method", "ties", "--t", "0.3"], "--t: merge method ties has no parameter 't'"),
    (["--method", "slerp", "--t", "0.3", "-w", "0.5"], "--weight: merge method slerp has no parameter 'weight'"),
    (["-p", "weight=2"], "--param weight: give the weights as --weight / -w"),
])
def test_the_short_form_refuses_a_parameter_its_method_does_not_take(llmctl, pair, tmp_path, args, message):
    out = tmp_path / "out"
    r = llmctl("merge", *pair, *args, "-o", out)
    assert r.code == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_declared_short_form_parameters_still_merge(llmctl, pair, tmp_path):
    assert llmctl("merge", *pair, "-w", "1", "-w", "1", "-p", "normalize=false", "-o", tmp_path / "l").code == 0
    assert llmctl("merge", *pair, "--method", "slerp", "--t", "0.3", "-o", tmp_path / "s").code == 0
    assert llmctl("merge", *pair, "--method", "slerp", "-p", "t=0.3", "-o", tmp_path / "p").code == 0
    assert llmctl("merge", *pair, "--method", "ties", "--density", "0.5", "-p", "lambda=0.9",
                  "-o", tmp_path / "t").code == 0


def test_a_mergekit_recipe_keeps_ignoring_undeclared_parameters(llmctl, pair, tmp_path):
    """mergekit reads only the parameters its method declares; a recipe it runs runs here unchanged."""
    a, b = pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.5}}\n"
                      f"  - model: {b}\n    parameters: {{weight: 1}}\nparameters: {{t: 0.3}}\n")
    assert llmctl("merge", "--config", recipe, "-o", tmp_path / "out").code == 0


# -- 5. merge refuses quantized inputs up front ---------------------------------------------------


def test_merge_refuses_a_quantized_checkpoint_once_up_front(llmctl, pair, tmp_path):
    a, b = pair
    q = tmp_path / "q"
    r = llmctl("quantize", b, "-m", "int8", "-o", q)
    assert r.code == 0, r.stderr
    for args in ([a, q], [q, a, "--method", "slerp", "--t", "0.5"]):
        r = llmctl("merge", *args, "-o", tmp_path / "out")
        assert r.code == 2, r.stderr
        assert f"{q} is quantized or transformed" in r.stderr and "merge needs dense checkpoints" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_merge_refuses_a_qlora_adapter_once_up_front(llmctl, chat_base, chats, tmp_path):
    adapter = tmp_path / "qlora"
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    r = llmctl("finetune", chat_base, "--config", "tiny", "--method", "qlora", "--data", chats, "max_steps=1",
               f"chat_template={tmp_path / 't.jinja'}",
               "adapter.target_modules=all-linear", "-o", adapter)
    assert r.code == 0, r.stderr
    for model in (str(adapter), f"{chat_base}+{adapter}"):
        r = llmctl("merge", chat_base, model, "-o", tmp_path / "out")
        assert r.code == 2, r.stderr
        assert "adapter on a quantized base (nf4: QLoRA)" in r.stderr and "merge needs dense checkpoints" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no scratch left
