"""Run a merge: one output tensor at a time, each input read by one pread into a reused buffer
and the result written at once by the streaming `CheckpointWriter`, so memory holds about one
tensor per input plus the result, whatever the model size. Methods declared `arrays` run on
numpy without importing torch (`arrays.py`).

    result = merge(load_recipe("merge.yaml"), "out", force=False, seed=0, report=REPORTER)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from pathlib import Path

from llmctl.core.checkpoint import TOKENIZER_FILES, CheckpointWriter, open_checkpoint
from llmctl.core.merge.adapters import materialise, split
from llmctl.core.merge.methods import METHODS, Inputs
from llmctl.core.merge.arrays import FLOATS, backend_for, narrowed
from llmctl.core.merge.plan import LAYER_KEYS, Job, Plan, plan, promote
from llmctl.core.merge.recipe import Recipe
from llmctl.core.outputs import OUTPUT_KINDS
from llmctl.core.report import SILENT, Reporter
from llmctl.errors import CheckpointError, UsageError

KIND = "merge"


@OUTPUT_KINDS.register(KIND)
def _is_merge(path: Path) -> bool:
    """A checkpoint written by `llmctl merge`."""
    import json

    try:
        return json.loads((path / "llmctl.json").read_text(encoding="utf-8")).get("command") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def merge(recipe: Recipe, out: str | os.PathLike, *, force: bool = False, seed: int = 0,
          max_shard_bytes: int = 2 * 1024**3, report: Reporter = SILENT, record: dict | None = None) -> dict:
    """Merge per `recipe` into the checkpoint directory `out`; returns a summary. The plan
    (and every check) is complete before the output is created."""
    started = time.perf_counter()
    METHODS.get(recipe.merge_method)  # an unknown method fails before adapters are materialised
    check_dense(recipe.models())
    with contextlib.ExitStack() as stack:
        adapters = [ref for ref in recipe.models() if split(ref) is not None]
        merged, parents = materialise(adapters, Path(stack.enter_context(scratch(out)))) if adapters else ({}, {})
        p = plan(recipe, opened={ref: open_checkpoint(path) for ref, path in merged.items()})
        tokenizer = _tokenizer_dir(recipe, p, stack)
        layout = {job.name: (job.shape, job.dtype) for job in p.jobs}
        total = sum(_nbytes(job) for job in p.jobs)
        xp = backend_for(p)
        with CheckpointWriter(out, layout, force=force, max_shard_bytes=max_shard_bytes) as writer, \
                report.progress(f"merge ({recipe.merge_method})", total=total, unit="B") as bar:
            for job in p.jobs:
                tensor, dtype = merged_tensor(p, job, recipe, seed, xp)
                xp.write(writer, job.name, xp.cast(tensor, dtype, job.dtype), job.dtype)
                bar.advance(_nbytes(job))
            source = p.checkpoints[p.config_source]
            lineage = _lineage(recipe, p, seed, record, parents)
            writer.finish(_config(p, recipe), generation_config=source.generation_config, tokenizer_dir=tokenizer,
                          lineage=lineage, extra_files={"mergekit_config.yml": _yaml(recipe)})
    return {"output": str(out), "method": recipe.merge_method, "models": list(p.checkpoints),
            "tensors": len(p.jobs), "layers": len(p.layers), "bytes": total,
            "seconds": round(time.perf_counter() - started, 3)}


def check_dense(refs: list[str]) -> None:
    """UsageError, before anything is read or written, for an input whose tensors are not dense
    weights: a quantized (or otherwise transformed) checkpoint, or an adapter trained on a
    quantized base (QLoRA), whose merged weights would be quantized too."""
    from llmctl.core.adapters.files import base_path, base_transforms

    for ref in refs:
        found = split(ref)
        if found is not None:
            base, adapter = found
            under = base_transforms(adapter)
            if under:
                raise UsageError(f"{adapter} is an adapter on a quantized base ({', '.join(under)}: QLoRA); merge needs "
                                 "dense checkpoints, and folding it in would quantize its base again")
            ref = base if base is not None else str(base_path(adapter))
        if not (Path(ref) / "config.json").is_file():
            continue  # not a checkpoint: the plan names the problem
        ck = open_checkpoint(ref)
        quant = ck.config.get("quantization_config")
        specs = (ck.lineage or {}).get("transforms") if isinstance(ck.lineage, dict) else None
        if quant or specs:
            kinds = [str(quant.get("quant_method", "?")) if isinstance(quant, dict) else "quantized"] if quant else []
            kinds += [str(s.get("type", "?")) if isinstance(s, dict) else str(s) for s in specs or []]
            raise UsageError(f"{ref} is quantized or transformed ({', '.join(kinds)}); merge needs dense "
                             "checkpoints: merge their float originals")


def merged_tensor(p: Plan, job: Job, recipe: Recipe, seed: int, xp):
    """The merged value of one job (inputs converted to the recipe's `dtype`, if any) on the
    back end `xp`, with its dtype name. An `arrays` method computes 16-bit merges in float32."""
    tensors = [xp.read(p.checkpoints[m], n, d, slot)
               for slot, ((m, n), d) in enumerate(zip(job.inputs, job.input_dtypes))]
    if not all(d in FLOATS for d in job.input_dtypes):  # integer buffers must agree
        if any(not xp.equal(t, tensors[0]) for t in tensors[1:]):
            raise CheckpointError(f"cannot merge {job.name!r}: a non-floating tensor differs between inputs")
        return tensors[0], job.input_dtypes[0]
    dtype = recipe.dtype or promote(list(job.input_dtypes))
    work = dtype if not p.method.arrays or dtype == "float64" else "float32"
    tensors = [xp.cast(xp.cast(t, d, dtype), dtype, work) for t, d in zip(tensors, job.input_dtypes)]
    if job.vocabulary:  # one row per output token in every input
        tensors = p.vocabulary.align([(m, t) for (m, _), t in zip(job.inputs, tensors)])
    if p.method.arrays:
        tensors = [xp.array(t) for t in tensors]
    base = tensors[job.base] if job.base is not None else None
    others = [t for i, t in enumerate(tensors) if i != job.base]
    generator = None
    if p.method.random:  # seeded per tensor name: the same merge whatever the order or subset
        import numpy as np

        key = hashlib.sha256(f"{seed}\0{job.name}".encode()).digest()
        generator = np.random.default_rng(int.from_bytes(key[:8], "little"))
    narrow = (lambda x: narrowed(x, dtype)) if work != dtype else (lambda x: x)
    out = p.method(Inputs(base, others, generator, narrow), **job.params)
    return xp.cast(xp.tensor(out) if p.method.arrays else out, work, dtype), dtype


def _nbytes(job: Job) -> int:
    import math

    from llmctl.core.checkpoint import DTYPES

    size = {name: n for name, n in DTYPES.values()}[job.dtype]
    return math.prod(job.shape) * size


def _config(p: Plan, recipe: Recipe) -> dict:
    """The config source's config.json with the output's layer count (and per-layer lists) and dtype."""
    config = dict(p.checkpoints[p.config_source].config)
    for key in LAYER_KEYS:
        if key in config:
            config[key] = len(p.layers)
    types = {m: ck.config.get("layer_types") for m, ck in p.checkpoints.items()}
    if isinstance(config.get("layer_types"), list) and all(isinstance(types[m], list) for m, _ in p.layers):
        config["layer_types"] = [types[m][i] for m, i in p.layers]
    if p.vocabulary is not None:
        config["vocab_size"] = p.vocabulary.size
    dtype = recipe.out_dtype or recipe.dtype
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype
    return config


def _tokenizer_dir(recipe: Recipe, p: Plan, stack: contextlib.ExitStack) -> Path | None:
    """Whose tokenizer the output gets: the merged vocabulary's (written to a scratch directory),
    else the config source's when it has one."""
    if p.vocabulary is not None:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".tokenizer-")))
        p.vocabulary.tok.save(directory)
        return directory
    source = recipe.tokenizer_source
    model = p.config_source if source in (None, "base", "union") else source
    path = Path(p.checkpoints[model].path) if model in p.checkpoints else Path(model)
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return path
    if source is not None:
        raise UsageError(f"tokenizer_source: {path} has no tokenizer files")
    return None


def _lineage(recipe: Recipe, p: Plan, seed: int, record: dict | None, adapters: dict[str, list[str]]) -> dict:
    """Every parent (an adapter input: its base and the adapter) with the recipe and the seed."""
    config = {"recipe": recipe.raw, "seed": seed if p.method.random else None, **(record or {})}
    parents = [path for ref, ck in p.checkpoints.items() for path in adapters.get(ref, [ck.path])]
    return {"command": KIND, "config": config, "merge_method": recipe.merge_method,
            "parents": list(dict.fromkeys(str(Path(path).resolve()) for path in parents))}


def scratch(out: str | os.PathLike) -> tempfile.TemporaryDirectory:
    """A temporary directory beside `out` (same file system), removed when the block ends."""
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.merge-", dir=parent)


def _yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.raw, sort_keys=False)
