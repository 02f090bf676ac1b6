"""Evaluation tasks: each owns its prompts and its checks (the executor never knows a task's logic)."""
