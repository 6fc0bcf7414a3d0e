"""Chunked target log-probabilities: equal to a full log-softmax, with and without gradients,
never holding a [rows, vocab] float32 block of logits larger than one chunk."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmctl.core.model.logprobs import token_logprobs  # noqa: E402

N, H, V = 37, 16, 101


def _setup():
    torch.manual_seed(0)
    features = torch.randn(N, H, requires_grad=True)
    head = torch.nn.Linear(H, V)
    targets = torch.randint(0, V, (N,))
    return features, head, targets


def test_equals_full_log_softmax_without_gradients():
    features, head, targets = _setup()
    widest = []

    def to_logits(x):
        widest.append(x.shape[0])
        return head(x).float()

    with torch.no_grad():
        full = torch.log_softmax(head(features), -1)
        logprobs, hits = token_logprobs(features.view(1, N, H), targets.view(1, N), to_logits, vocab=V,
                                        greedy=True, chunk=5 * V, min_rows=2)
    assert max(widest) == 5 and len(widest) == 8  # 37 rows, 5 at a time
    torch.testing.assert_close(logprobs, full.gather(-1, targets[:, None])[:, 0])
    assert torch.equal(hits, full.argmax(-1) == targets)
    logits_in = head(features).detach()  # features that are already logits: head None
    with torch.no_grad():
        plain, none = token_logprobs(logits_in, targets, chunk=3 * V, min_rows=1)
    assert none is None
    torch.testing.assert_close(plain, torch.log_softmax(logits_in, -1).gather(-1, targets[:, None])[:, 0])


def test_gradients_equal_the_full_computation_and_chunks_are_not_kept():
    features, head, targets = _setup()
    reference = torch.log_softmax(head(features), -1).gather(-1, targets[:, None])[:, 0].sum()
    grads = torch.autograd.grad(reference, [features, head.weight])

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logprobs, _ = token_logprobs(features, targets, head, vocab=V, chunk=4 * V, min_rows=1)
    assert sum(saved) < N * V  # chunks are recomputed in backward, not stored
    ours = torch.autograd.grad(logprobs.sum(), [features, head.weight])
    for a, b in zip(ours, grads):
        torch.testing.assert_close(a, b)


def test_greedy_hits_mark_exactly_the_argmax_targets():
    features, head, _ = _setup()
    with torch.no_grad():
        best = head(features).argmax(-1)
        targets = torch.where(torch.arange(N) % 3 == 0, best, (best + 1) % V)  # every third target is the argmax
        _, hits = token_logprobs(features, targets, head, vocab=V, greedy=True, chunk=5 * V, min_rows=2)
    assert hits.dtype == torch.bool
    assert torch.equal(hits, torch.arange(N) % 3 == 0)


@pytest.mark.parametrize("grad", [True, False])
def test_no_targets_give_an_empty_float32_result(grad):
    features, head, _ = _setup()
    with torch.set_grad_enabled(grad):
        logprobs, _ = token_logprobs(features[:0].bfloat16(), torch.zeros(0, dtype=torch.long), head, vocab=V)
    assert logprobs.shape == (0,) and logprobs.dtype == torch.float32
