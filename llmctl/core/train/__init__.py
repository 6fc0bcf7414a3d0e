"""Pre-training: recipe schema, optimiser, schedules, data, resumable state, the loop."""
