"""The training side of the agent: what is watched and when, hooks on modules and optimizers, one step's capture."""
