"""Tiny models and tokenizers built offline, for tests and benchmarks (no hub access).

``tiny_tokenizer()`` trains a byte-level BPE tokenizer in-process on a small built-in corpus;
``tiny_causal_lm()`` / ``tiny_seq2seq_lm()`` build randomly initialised models from a config.
``save_tiny_causal(path)`` writes both to a folder that ``from_pretrained`` loads.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nSummarize the given paragraph.\n\n### Input:\nThe cat sat on the mat.\n\n### Response:\n",
    "Classify the sentiment of the review as positive or negative. Positive. Negative.",
    "Translate the sentence into French. Bonjour, comment allez-vous?",
    "Give three tips for staying healthy. Eat well, sleep enough, and move every day.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - * / = ? ! , . : ;",
    "Copy the input exactly. abc def ghi jkl mno pqr stu vwx yz",
    "user assistant system <|im_start|> <|im_end|>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512, chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(tokenizer=None, seed: int = 0, hidden_size: int = 64, layers: int = 2, **config):
    """``config``: more LlamaConfig fields. Untied embeddings with a wide init (``tie_word_embeddings=False,
    initializer_range=0.5``) give models whose greedy answers are words that differ from seed to seed; the
    default tied ones repeat the prompt's last token."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{"tie_word_embeddings": True, **config},
    )
    return LlamaForCausalLM(config)


def tiny_seq2seq_lm(tokenizer=None, seed: int = 0, d_model: int = 64):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=d_model * 2, num_layers=2,
        num_decoder_layers=2, num_heads=4, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5ForConditionalGeneration(config)


def save_tiny_causal(path: Path, seed: int = 0, **config) -> Path:
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, seed=seed, **config)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
