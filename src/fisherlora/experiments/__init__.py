"""The runner behind the command-line tool: tasks, models, the training loop, evaluation."""
