"""Training frameworks and tuners: the Lightning and Hugging Face Trainer callbacks, the Optuna pruner. The agent
itself never imports them."""
