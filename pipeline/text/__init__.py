"""Text utilities: ROUGE-L, instruction/instance rules, completion parsing. No project imports above them."""
