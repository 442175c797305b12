"""Callbacks for training frameworks (Lightning, Hugging Face Trainer); the agent itself never imports them."""
