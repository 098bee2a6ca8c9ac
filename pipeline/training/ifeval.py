"""IFEval: does the model follow instructions whose compliance a program can check ("answer in under 100
words", "no commas", "wrap the answer in JSON")?

The prompts are a JSON-lines file in IFEval's own layout (``key``, ``prompt``, ``instruction_id_list``,
``kwargs``; the 541 prompts of the original release, or any subset), given as ``evaluation.ifeval``. Each prompt
is answered greedily through the model's chat template, and the answer is judged by the checkers of the
``if-verifiable`` package (extra ``ifeval``), strict and loose (loose also accepts the answer without its first or
last line or its markdown emphasis, as the original does). Four numbers, as the field reports them:

* prompt-level strict / loose: the share of prompts whose every instruction is followed;
* instruction-level strict / loose: the share of all instructions followed.

Their units for the paired bootstrap are per prompt: 0/1 for the prompt level, (followed, instructions) pairs for
the instruction level. ``ifeval_max_prompts`` takes a seeded subset (for CPU runs), and the result says so.

Two changes to the checkers, so that nothing is downloaded at run time: NLTK's trained Punkt model is a download,
so the sentence counter uses an untrained Punkt tokenizer (sentences end at ., ! and ?, with Punkt's own rules
for initials and numbers), and the word tokenizer of the capital-words check reads the answer as one line
instead of splitting it into sentences first.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.errors import MissingExtra, UserError
from pipeline.records import TrainingExample
from pipeline.training import metrics

log = logging.getLogger(__name__)

KEYS = ("prompt", "instruction_id_list", "kwargs")
# metric -> how its units combine (see pipeline.training.evaluation.METRICS)
METRICS = {"ifeval_prompt_strict": "mean", "ifeval_prompt_loose": "mean",
           "ifeval_instruction_strict": "ratio", "ifeval_instruction_loose": "ratio"}


def load_prompts(path: str | Path, max_prompts: int | None, seed: int) -> list[dict[str, Any]]:
    """The prompts of an IFEval file, or a seeded subset of ``max_prompts`` of them (in file order)."""
    from pipeline.training.evaluation import sample

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"evaluation.ifeval: cannot read {path} ({e.strerror or e})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
        missing = [k for k in KEYS if k not in rec] if isinstance(rec, dict) else list(KEYS)
        if missing:
            raise UserError(f"{path}:{n}: an IFEval prompt needs {', '.join(KEYS)} (missing: {', '.join(missing)})")
        if len(rec["instruction_id_list"]) != len(rec["kwargs"]):
            raise UserError(f"{path}:{n}: instruction_id_list and kwargs differ in length")
        prompts.append({"key": rec.get("key", n), **{k: rec[k] for k in KEYS}})
    if not prompts:
        raise UserError(f"{path}: no IFEval prompts")
    return sample(prompts, max_prompts, seed, "ifeval")


@functools.cache
def _checkers() -> tuple[Any, dict[str, Any]]:
    """if-verifiable's ``evaluate_instructions`` and IFEval's checker registry, with the sentence counter's Punkt
    model replaced by an untrained one (no download)."""
    try:
        from if_verifiable.common import evaluate_instructions
        from if_verifiable.ifeval import instructions_util
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
        from nltk.tokenize.punkt import PunktSentenceTokenizer
    except ImportError:
        raise MissingExtra("IFEval", "ifeval", "if-verifiable") from None
    import nltk

    tokenizer = PunktSentenceTokenizer()

    class _Nltk:  # nltk as the checkers see it: word_tokenize without its trained sentence splitter
        def __getattr__(self, name: str) -> Any:
            return getattr(nltk, name)

        @staticmethod
        def word_tokenize(text: str, language: str = "english", preserve_line: bool = True) -> list[str]:
            return nltk.word_tokenize(text, language, preserve_line=True)

    instructions_util._get_sentence_tokenizer = lambda: tokenizer
    instructions_util.nltk = _Nltk()
    return evaluate_instructions, INSTRUCTION_DICT


def check(prompt: dict[str, Any], answer: str) -> dict[str, Any]:
    """The checkers' verdicts on one answer: per instruction strict and loose, and the prompt's."""
    evaluate_instructions, registry = _checkers()
    unknown = [i for i in prompt["instruction_id_list"] if i not in registry]
    if unknown:
        raise UserError(f"evaluation.ifeval: prompt {prompt['key']}: unknown instruction {', '.join(unknown)}")
    # the checkers read kwargs without the keys the released file fills with null
    kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in prompt["kwargs"]]
    results, _ = evaluate_instructions(response=answer, instruction_id_list=prompt["instruction_id_list"],
                                       kwargs_list=kwargs, prompt=prompt["prompt"], instruction_registry=registry)
    strict = [bool(r.strict_pass) for r in results]
    loose = [bool(r.loose_pass) for r in results]
    if len(results) != len(prompt["instruction_id_list"]):  # an empty answer: the package judges nothing
        strict = loose = [False] * len(prompt["instruction_id_list"])
    return {"strict": strict, "loose": loose, "prompt_strict": all(strict), "prompt_loose": all(loose)}


def scores(verdicts: list[dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, list]]:
    """The four accuracies and their bootstrap units, from the verdicts of every prompt."""
    units: dict[str, list] = {
        "ifeval_prompt_strict": [float(v["prompt_strict"]) for v in verdicts],
        "ifeval_prompt_loose": [float(v["prompt_loose"]) for v in verdicts],
        "ifeval_instruction_strict": [[float(sum(v["strict"])), float(len(v["strict"]))] for v in verdicts],
        "ifeval_instruction_loose": [[float(sum(v["loose"])), float(len(v["loose"]))] for v in verdicts],
    }
    values: dict[str, float | None] = {}
    for name, kind in METRICS.items():
        u = units[name]
        if not u:
            values[name] = None
        elif kind == "mean":
            values[name] = sum(u) / len(u)
        else:
            total = sum(n for _, n in u)
            values[name] = sum(k for k, _ in u) / total if total else None
    return values, units


def evaluate(model: Any, tok: Any, prompts: list[dict[str, Any]], max_new_tokens: int, batch_size: int,
             subset_of: int) -> dict[str, Any]:
    """Greedy answers through the chat template, judged by the checkers: the accuracies, their units and the
    answers with their verdicts."""
    examples = [TrainingExample(id=f"ifeval_{p['key']}", task_id=f"ifeval_{p['key']}", instruction=p["prompt"],
                                format="chat", messages=[{"role": "user", "content": p["prompt"]}])
                for p in prompts]
    answers = metrics.generate_ids(model, tok, examples, max_new_tokens, batch_size)
    texts = [tok.decode(ids, skip_special_tokens=True).strip() for ids, _ in answers]
    verdicts = [check(p, t) for p, t in zip(prompts, texts)]
    values, units = scores(verdicts)
    log.info("IFEval on %d prompts: prompt-level strict %s, loose %s", len(prompts),
             values["ifeval_prompt_strict"], values["ifeval_prompt_loose"])
    return {**values, "ifeval_prompts": len(prompts), "ifeval_subset_of": subset_of, "units": units,
            "samples": [{"key": p["key"], "prompt": p["prompt"], "answer": t, "stopped": bool(s), **v}
                        for p, t, (_, s), v in zip(prompts, texts, answers, verdicts)]}
