"""Model merging: mergekit recipes, registered tensor methods, a streaming run.

    recipe.py    the YAML schema (models / slices, parameters with filters and gradients)
    methods.py   METHODS: linear, slerp, nuslerp, task arithmetic family, model_stock, passthrough
    sparsify.py  SPARSIFIERS: magnitude, random, magnitude_outliers, della_magprune
    plan.py      a recipe resolved against its inputs, one job per output tensor, all checks first
    vocab.py     tokenizer_source: the output vocabulary and every input's rows aligned to it
    arrays.py    the back ends: torch, or numpy for methods declared `arrays` (no torch import)
    run.py       `merge`: tensor by tensor, one pread per input, into the streaming CheckpointWriter
"""

from llmctl.core.merge.methods import METHODS, Inputs, Method, Param
from llmctl.core.merge.plan import plan
from llmctl.core.merge.recipe import Recipe, load_recipe, parse_recipe
from llmctl.core.merge.run import merge

__all__ = ["METHODS", "Inputs", "Method", "Param", "Recipe", "load_recipe", "merge", "parse_recipe", "plan"]
