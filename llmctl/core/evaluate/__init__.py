"""Evaluation: perplexity, multiple choice and generation tasks over a scoring model.

    lm = runner.load_scorer(ckpt, device=..., dtype=..., batch_size=16)   # lm.ScoringModel
    for task in tasks.load_tasks(["word_order", "my_task.yaml"]):
        print(task.name, task.run(lm))

Modules: `lm` (batched log-likelihoods), `perplexity` (strided and rolling), `choice`
(multiple choice), `generation` (generated answers), `metrics` (EM, BLEU, chrF, ROUGE),
`tasks` (registry, YAML, few-shot), `builtin` (generated datasets), `runner` (checkpoints).
"""
