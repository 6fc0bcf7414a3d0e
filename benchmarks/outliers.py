"""Give a trained model the activation outliers of large LLMs, without changing its function.

Billion-parameter models have a few hidden features far larger than the rest (Dettmers et al.,
2022, LLM.int8()); AWQ's per-channel scales and Wanda's |W|·‖X_j‖ score were designed for them.
The small models this machine trains have none (max/median ‖X_j‖ of 2–20, BENCHMARKS.md). This
rescales a `share` of the input channels of every block linear by `factor` and divides the
weights that read them by the same factor, so the model computes the same function (to float32
rounding) but those channels' activations are `factor`× larger and their weights `factor`×
smaller — the situation the papers describe:

    norm weight[j] · c        q/k/v (gate/up) weight[:, j] / c      (the inputs of q/k/v, gate/up)
    up_proj weight[j] · c     down_proj weight[:, j] / c            (act(gate)·up is linear in up)
    v_proj weight[j] · c      o_proj weight[:, every query head reading KV channel j] / c

    trained(...)  → with_outliers(t, factor=20, share=0.02)  → a Trained whose model has outliers
"""

from __future__ import annotations

import dataclasses
import json


def add_outliers(model, factor: float, share: float, seed: int = 0) -> None:
    """Rescale `model` (an llmctl Llama-style Transformer) in place as the module docstring says."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def pick(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=g)[: max(1, round(share * n))]

    with torch.no_grad():
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            for norm, readers in ((block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                                  (block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])):
                j = pick(norm.weight.numel())
                norm.weight[j] *= factor
                for linear in readers:
                    linear.weight[:, j] /= factor
            j = pick(mlp.up_proj.out_features)
            mlp.up_proj.weight[j] *= factor
            mlp.down_proj.weight[:, j] /= factor
            j = pick(attn.v_proj.out_features)
            attn.v_proj.weight[j] *= factor
            group, D = attn.num_heads // attn.num_kv_heads, attn.head_dim
            for channel in j.tolist():
                kv, d = divmod(channel, D)
                for head in range(kv * group, (kv + 1) * group):
                    attn.o_proj.weight[:, head * D + d] /= factor


def with_outliers(t, factor: float, share: float = 0.02):
    """`t` (a benchmarks.trained.Trained) with its model rescaled (cached beside it); the largest
    logit change the rescaling makes on a held-out window is recorded in outliers.json."""
    import torch

    from llmctl.core.model.io import load_model, save_model
    from llmctl.core.tokenizer import load_tokenizer

    here = t.model.parent / f"outliers-{factor:g}-{share:g}"
    record_file = here / "outliers.json"
    if not record_file.is_file():
        model = load_model(t.model)[0].eval()
        ids = torch.tensor(load_tokenizer(t.model).encode(t.val.read_text(encoding="utf-8"))[:256])[None]
        with torch.no_grad():
            before = model(ids).logits
            add_outliers(model, factor, share)
            change = (model(ids).logits - before).abs().max().item()
        save_model(model, here / "model", tokenizer_dir=t.model)
        record_file.write_text(json.dumps({"factor": factor, "share": share, "max_logit_change": change}))
    record = {**t.record, "outliers": json.loads(record_file.read_text())}
    return dataclasses.replace(t, model=here / "model", record=record)


def describe(record: dict) -> str:
    """The rescaling, as a clause for a results file's model line ('' without outliers)."""
    o = record.get("outliers")
    if not o:
        return ""
    return (f"; then {o['share']:.0%} of every block linear's input channels made {o['factor']:g}× larger (weights "
            f"reading them {o['factor']:g}× smaller: the same function, largest logit change "
            f"{o['max_logit_change']:.1e}; benchmarks/outliers.py)")


def suffix(record: dict) -> str:
    """A file-name suffix for results measured with outliers ('' without)."""
    o = record.get("outliers")
    return "" if not o else f"-outliers{o['factor']:g}"

