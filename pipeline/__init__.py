"""seedtune: seed tasks in, an instruction dataset and an instruct-tuned model out."""

__version__ = "0.1.0"
