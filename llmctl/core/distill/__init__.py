"""Knowledge distillation: a student learns a frozen teacher's distribution (`llmctl distill`).

| module         | job                                                                        |
| -------------- | -------------------------------------------------------------------------- |
| `losses.py`    | `LOSSES`: forward/reverse KL, generalised JSD, CE, hidden-state MSE/cosine   |
| `chunked.py`   | `fused_chunks`: a loss over logits a chunk of rows at a time, grads at once |
| `criterion.py` | `Criterion`: the weighted losses of a batch; layer map; `Projections`       |
| `store.py`     | offline teacher top-k log-probs: `save_teacher_outputs`, `TeacherOutputs`   |
| `student.py`   | the student from the teacher's blocks; the tokenizer check                  |
| `objective.py` | `Distill`, the trainer objective `distill` (entry point of `llmctl.objectives`) |
| `config.py`    | `DistillConfig`, its `objective_args`                                       |
"""
