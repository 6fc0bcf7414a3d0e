"""Round 10 edges: the pre-run checks (`core/checks.py`), RL prompt records (`core/data/rl.py`)
and how `parallel_map` shares torch's threads (`core/parallel.py`)."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from llmctl.core import checks
from llmctl.core.checks import check_finite, check_ids_fit, check_language_model, check_tokenizer_fits
from llmctl.core.data.rl import read_prompts
from llmctl.core.parallel import parallel_map
from llmctl.errors import CheckpointError, ConfigError, DataError


# -- checks ------------------------------------------------------------------------------------


def test_a_tokenizer_fits_up_to_the_vocab_size_and_not_beyond():
    check_tokenizer_fits(SimpleNamespace(vocab_size=100), 100, "ck")  # equal: fits
    check_tokenizer_fits(SimpleNamespace(vocab_size=99), 100, "ck")
    with pytest.raises(CheckpointError) as e:
        check_tokenizer_fits(SimpleNamespace(vocab_size=1001), 1000, "ck")
    assert str(e.value) == ("ck: the tokenizer has 1,001 tokens but the model's vocab_size is 1,000; use the "
                            "tokenizer the model was trained with")


def test_ids_fit_scans_every_window_of_every_array(monkeypatch):
    monkeypatch.setattr(checks, "SCAN_TOKENS", 4)  # windows of 4 ids
    ok = np.array([0, 1, 2, 3, 4, 5, 6, 9, 1], dtype=np.uint16)
    check_ids_fit([ok, np.array([9], dtype=np.uint16)], 10, "data")  # the largest id is vocab_size - 1
    for bad in ([0, 1, 2, 3, 4, 5, 6, 7, 10], [10, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1234]):
        with pytest.raises(ConfigError) as e:
            check_ids_fit([ok, np.array(bad, dtype=np.uint16)], 10, "data/train")  # only the 2nd array's last window
        assert str(e.value) == (f"config key 'data': data/train holds token id {max(bad):,}, outside the model's "
                                "vocabulary of 10; re-encode it with the model's tokenizer")
    check_ids_fit([np.array([], dtype=np.uint16)], 10, "empty")  # nothing to scan


def test_finite_weights_name_the_first_bad_parameter():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    check_finite(model, "ck")
    with torch.no_grad():
        model[1].bias[1] = float("inf")
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError) as e:
        check_finite(model, "ck")
    assert str(e.value) == ("ck: the checkpoint has non-finite weights (NaN or inf in 1.weight); use an earlier "
                            "checkpoint of the run")
    with torch.no_grad():
        model[1].weight[0, 0] = 0.0
    with pytest.raises(CheckpointError, match=r"in 1\.bias\)"):
        check_finite(model, "ck")
    integer = nn.Module()
    integer.register_parameter("ids", nn.Parameter(torch.tensor([1, 2]), requires_grad=False))
    meta = nn.Linear(2, 2, device="meta")
    check_finite(integer, "ck")  # integer tensors hold no NaN
    check_finite(meta, "ck")  # nothing loaded yet: not read


def test_a_reward_model_is_refused_where_text_is_generated():
    check_language_model(SimpleNamespace(), "ck")
    check_language_model(SimpleNamespace(num_labels=0), "ck")
    check_language_model(SimpleNamespace(num_labels=None), "ck")
    with pytest.raises(CheckpointError) as e:
        check_language_model(SimpleNamespace(num_labels=1), "rm")
    assert str(e.value) == ("rm is a reward model (a sequence classifier with 1 score(s)): it scores text (eval "
                            "type pairwise), it does not generate")


# -- RL prompts ---------------------------------------------------------------------------------


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompts_are_read_in_order_from_every_file(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "2+2?", "answer": "4"},
                                      {"prompt": [{"role": "user", "content": "hi"}], "tests": ["x"]}])
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"prompt": "last", "answer": "z"}]))
    assert read_prompts([a, b]) == [{"prompt": "2+2?", "answer": "4"},
                                    {"prompt": [{"role": "user", "content": "hi"}], "tests": ["x"]},
                                    {"prompt": "last", "answer": "z"}]


@pytest.mark.parametrize("record, message", [
    ({"question": "q", "answer": "a"}, "{}:2: an RL record needs a 'prompt' (it has answer, question)"),
    ({}, "{}:2: an RL record needs a 'prompt' (it has no fields)"),
    ({"prompt": None, "b": 1}, "{}:2: an RL record needs a 'prompt' (it has b, prompt)"),
    ({"prompt": ""}, "{}:2: empty prompt"),
    ({"prompt": []}, "{}:2: field 'prompt' must be a non-empty list of messages"),
    ({"prompt": [{"role": "user"}]}, "{}:2: prompt[0] must be an object with string 'role' and 'content'"),
])
def test_a_bad_prompt_record_is_named_by_file_and_line(tmp_path, record, message):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(DataError) as e:
        read_prompts([path])
    assert str(e.value) == message.format(path)


def test_no_records_at_all_is_an_error_naming_every_file(tmp_path):
    a, b = _jsonl(tmp_path / "a.jsonl", []), _jsonl(tmp_path / "b.jsonl", [])
    with pytest.raises(DataError) as e:
        read_prompts([a, b])
    assert str(e.value) == f"{a}, {b}: no records"


# -- parallel_map's threads ----------------------------------------------------------------------


@pytest.mark.parametrize("threads, items, workers, each", [(4, 3, 3, 1), (4, 2, 2, 2), (3, 5, 3, 1), (2, 2, 2, 1)])
def test_workers_share_the_threads_out(threads, items, workers, each):
    """min(threads, items) workers with threads // workers intra-op threads each; the caller's
    grad mode carries over (inference mode is covered by test_parallel.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    barrier = threading.Barrier(workers, timeout=10)  # all workers run at once, or this times out
    seen = []

    def fn(i):
        seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled()))
        if i < workers:
            barrier.wait()
        time.sleep(0.05)  # a free thread would take the next item meanwhile
        return i * i

    try:
        with torch.no_grad():
            assert list(parallel_map(fn, range(items), torch.device("cpu"))) == [i * i for i in range(items)]
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert len({ident for ident, _, _ in seen}) == workers
    assert {(n, grad) for _, n, grad in seen} == {(each, False)}


def test_off_cpu_it_is_a_plain_map():
    caller = threading.get_ident()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = list(parallel_map(lambda i: (threading.get_ident(), i), range(3), torch.device("meta")))
    finally:
        torch.set_num_threads(before)
    assert out == [(caller, 0), (caller, 1), (caller, 2)]


def test_an_error_cancels_the_queued_items_and_waits_for_the_running_ones():
    """After the error reaches the caller nothing runs any more: items not started are
    cancelled, the one running on the other worker has finished."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    done = []

    def fn(i):
        if i == 0:
            raise ValueError("item 0")
        time.sleep(0.1)
        done.append(i)
        return i

    try:
        with pytest.raises(ValueError, match="item 0"):
            list(parallel_map(fn, range(40), torch.device("cpu")))
        finished = list(done)
        time.sleep(0.3)
    finally:
        torch.set_num_threads(before)
    assert finished == done  # nothing still running after the error came back
    assert 1 <= len(done) < 39  # the running item finished; the queued ones never started
