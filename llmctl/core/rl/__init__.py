"""Reinforcement learning from verifiable rewards: the `grpo` objective and its verifiers.

| module         | job                                                                         |
| -------------- | --------------------------------------------------------------------------- |
| `grpo.py`      | `GRPO` (objective `grpo`): sampling, group advantages, TRL's clipped loss     |
| `verifiers.py` | `VERIFIERS` (group `llmctl.verifiers`): exact match, regex, number, function, unit tests |
"""
