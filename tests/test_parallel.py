"""parallel_map: independent CPU passes side by side, one intra-op thread each."""

from __future__ import annotations

import threading

import pytest
import torch

from llmctl.core.parallel import parallel_map


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_runs_items_on_single_threaded_workers_in_order(two_threads):
    seen = []

    def fn(i):
        seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return torch.full((3,), float(i)) @ torch.ones(3)

    with torch.inference_mode():
        out = list(parallel_map(fn, range(6), torch.device("cpu")))
    assert [float(x) for x in out] == [3.0 * i for i in range(6)]
    assert {ident for ident, _, _ in seen} != {threading.get_ident()}  # ran on worker threads
    assert all(threads == 1 and inference for _, threads, inference in seen)
    assert torch.get_num_threads() == 2  # restored


def test_plain_map_when_nothing_to_share(two_threads):
    caller = threading.get_ident()
    assert list(parallel_map(lambda i: (threading.get_ident(), i), [7], torch.device("cpu"))) == [(caller, 7)]
    torch.set_num_threads(1)
    assert {t for t, _ in parallel_map(lambda i: (threading.get_ident(), i), range(3), torch.device("cpu"))} == {caller}


def test_errors_propagate_and_threads_are_restored(two_threads):
    def fn(i):
        if i == 2:
            raise ValueError("item 2")
        return i

    with pytest.raises(ValueError, match="item 2"):
        list(parallel_map(fn, range(4), torch.device("cpu")))
    assert torch.get_num_threads() == 2
