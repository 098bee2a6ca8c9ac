"""Supervised fine-tuning: the data layer (tokenisation, masking, collation), training on transformers'
Trainer, and before/after evaluation."""
