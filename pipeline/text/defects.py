"""Rules that judge a defect, not a word: a task that asks a text model for something it cannot give.

The Self-Instruct blacklist drops every instruction that *mentions* "file", "picture", "plot" or "go to",
which on real data drops "Tom draws 3 cards", "a garden plot" and most programming tasks. These rules look
for the defect itself:

* ``artifact_request`` — the task asks for a non-text artifact: "Draw a cat", "Plot the graph of y = x²",
  "Create a bar chart of the sales", "Take a photo". A request for text about one ("a video script", "a
  description of an image", "ASCII art") is not that defect, nor is a request for code that makes one.
* ``missing_content`` — the task points at content that is not in the text: "Describe the attached photo",
  "Watch the video and summarise it", "In the picture below, how many cats are there?", an input that is only
  a link or a media file name.
* ``real_world_action`` — the task asks for an action in the world: "Go to the bakery", "Buy a ticket".

Programming tasks are exempt from the first two (code that reads a file, plots a chart or parses a URL is
text). Each function returns the matched words, for the rejection's reason, or ``None``.
"""

from __future__ import annotations

import functools
import re

# Sentence start, with an optional polite or sequencing lead-in.
_START = r"(?:^|[.!?;:\n]\s*|\bthen\s+)(?:please\s+|kindly\s+|now\s+|also\s+|(?:can|could|would|will)\s+you\s+)?"

_ARTIFACT = (r"picture|image|photo|photograph|drawing|painting|illustration|sketch|diagram|flowchart|flow chart|"
             r"chart|graph|plot|logo|icon|infographic|poster|map|video|animation|gif|meme|screenshot|audio|"
             r"recording|voice ?over|soundtrack|3d model|slide ?show|slides")
# After the artifact's name, these make it a text: "a video script", "a logo description".
_TEXT_ABOUT = (r"script|outline|description|caption|title|plan|idea|concept|storyboard|transcript|brief|prompt|"
               r"text|narration|agenda|summary|alt|storyline|lyrics|pitch|proposal|name|slogan|tagline|"
               r"analysis|review|critique|legend|label|question|quiz|puzzle|problem")
_FILLER = r"(?:(?!of\b|for\b|about\b|that\b|which\b|to\b|with\b|on\b|in\b|describing\b)[\w'-]+\s+){0,3}?"

_DRAW = re.compile(
    _START + r"(?P<m>(?:draw|sketch|paint|illustrate|doodle|colou?r in)\b"
    r"(?!\s+(?:a\s+|an\s+|the\s+|some\s+|two\s+|three\s+|\d+\s+)?(?:conclusion|comparison|parallel|inference|"
    r"distinction|lesson|analog|line between|card|ball|marble|lot|straw|name|number|sample|attention|upon|"
    r"on\b|from|out|up\b|back|near|closer|water|blood|breath|cash|money|ticket|up a|insight|contrast)))", re.I)
_PLOT = re.compile(_START + r"(?P<m>(?:plot|graph|chart)\s+(?:the|a|an|this|these|those|its|their|y|f)\b)", re.I)
_MAKE = re.compile(
    _START + r"(?P<m>(?:create|make|generate|produce|design|render|build|take|record|film|shoot|upload|print|"
    r"capture|animate)\s+(?:a|an|the|some|me\s+a|me\s+an|us\s+a|\d+)?\s*" + _FILLER + r"(?:" + _ARTIFACT +
    r")s?\b(?!\s*(?:-\s*)?(?:" + _TEXT_ABOUT + r")s?\b))", re.I)

_DEICTIC = (r"the|this|that|these|those|my|our|your|attached|above|below|following|given|provided|accompanying|"
            r"linked|uploaded|enclosed|shown|displayed|included")
_MEDIA = (r"image|picture|photo|photograph|screenshot|video|clip|audio|recording|podcast|diagram|figure|chart|"
          r"graph|map|drawing|painting|illustration|attachment|pdf|spreadsheet|slide")
_CONTAINER = r"website|web ?site|web ?page|webpage|link|url|file|document|article|page"
# Nouns that make a mention ordinary: "the picture frame", "the map app".
_COMPOUND = r"frame|book|album|booth|shop|store|studio|card|session|game|camera|player|editor|app|day|show|size"
_POINT = (r"(?P<m>\b(?:{verbs})\s+(?:(?:" + _DEICTIC + r")\s+)+(?:[\w'-]+\s+){0,2}?(?:{nouns})s?\b(?!\s*(?:" +
          _COMPOUND + r")s?\b)(?!'))")
_POINT_VERBS = (r"watch|view|listen\s+to|look\s+at|see|refer\s+to|check|examine|observe|describe|caption|"
                r"analy[sz]e|summari[sz]e|review|read|open|visit|based\s+on|according\s+to")
# After a bare preposition only a pointing word counts: "on the map" is how a word problem speaks, "in the
# attached photo" is a pointer.
_STRONG = r"this|these|attached|above|below|following|given|provided|accompanying|linked|uploaded|enclosed|shown"
_POINT_MEDIA = re.compile(
    _POINT.replace("{verbs}", _POINT_VERBS + r"|shown\s+in|depicted\s+in|pictured\s+in").replace("{nouns}", _MEDIA)
    + "|" + _POINT.replace("{verbs}", r"in|on|from|using").replace(_DEICTIC, _STRONG).replace("{nouns}", _MEDIA)
    .replace("(?P<m>", "(?P<m2>"), re.I)
_POINT_CONTAINER = re.compile(_POINT.replace("{verbs}", _POINT_VERBS).replace("{nouns}", _CONTAINER), re.I)
_ATTACHED = re.compile(r"(?P<m>\b(?:attached|enclosed|uploaded)\s+(?:[\w'-]+\s+)?(?:file|image|photo|picture|"
                       r"document|pdf|video|audio|recording|screenshot|spreadsheet|chart|diagram)s?\b)", re.I)
_URL_ONLY = re.compile(r"^\s*(?:(?:https?://|www\.)\S+\s*)+$", re.I)
_MEDIA_FILE_ONLY = re.compile(r"^\s*[\w./\\ -]+\.(?:png|jpe?g|gif|bmp|webp|tiff?|heic|pdf|mp3|mp4|wav|m4a|ogg|"
                              r"mov|avi|mkv|docx?|xlsx?|pptx?)\s*$", re.I)
# An instruction about the link itself (its parts, its form), not about what it points to.
_LINK = r"(?:url|urls|link|links|address|addresses|domain|domains|web ?address)"
_ABOUT_LINKS = re.compile(
    r"\b(?:domain|hostname|host name|protocol|scheme|query string|slug|url parameters?|top-level domain|tld)\b"
    r"|" + _START + r"(?:parse|extract|validate|check|verify|shorten|encode|decode|classify|categori[sz]e|format|"
    r"split|normali[sz]e|sanitize|resolve|tell|determine|identify|is|are|does)\b[^.?!\n]{0,40}\b" + _LINK + r"\b"
    r"|\b" + _LINK + r"\b[^.?!\n]{0,40}\b(?:valid|invalid|secure|safe|phishing|malicious|spam|broken|"
    r"format|parts?|components?|path|extension|file name|filename|type)\b", re.I)

# A task about code: it asks for code (a request verb, then a program's noun or a language within the sentence),
# names code ("this Python function", "the following snippet", "in SQL", "using matplotlib"), or holds code.
# A language or library named in passing ("watch the video about Django") is not enough: mentioned words
# exempt nothing, or a defect would hide behind any technical word.
_LANG = (r"python|javascript|typescript|java|kotlin|golang|c\+\+|c#|php|perl|sql|mysql|postgres(?:ql)?|sqlite|"
         r"html5?|css3?|scala|haskell|matlab|numpy|pandas|matplotlib|seaborn|plotly|ggplot2?|opencv|pillow|latex|"
         r"tikz|svg|mermaid|graphviz|vba|powershell|bash|shell|zsh|django|jquery|react|node\.?js|vue(?:\.js)?|"
         r"angular|rust|swift|ruby|rails|excel|google sheets|regex|json|xml|yaml|markdown|ascii|unity|arduino|"
         r"tensorflow|pytorch|keras|scikit-learn|sklearn|spark|docker|kubernetes|git|linux|unix|windows batch")
_NOUN = (r"code|codes|program|programs|function|functions|script|scripts|class|classes|method|methods|snippet|"
         r"query|queries|regex|regular expression|algorithm|api|module|library|component|endpoint|loop|parser|"
         r"unit tests?|test cases?|macro|formula|command|one-liner|implementation|routine|procedure|app|"
         r"application|program's|website's code|web page's code|html page|web app|chatbot|bot")
_ASK = (r"write|implement|create|generate|build|code|program|fix|debug|refactor|optimi[sz]e|complete|convert|"
        r"rewrite|modify|edit|explain|review|translate|develop|design|make|modify|port|test|document|compile|run|"
        r"execute|improve|correct|simplify")
_CODE = re.compile(
    r"\b(?:" + _ASK + r")\b[^.?!\n]{0,80}?\b(?:" + _NOUN + "|" + _LANG + r")(?![\w+#])"
    r"|\b(?:" + _LANG + r")\s+(?:" + _NOUN + r")\b"
    r"|\b(?:in|using|with|via|into|from)\s+(?:" + _LANG + r")(?![\w+#])"
    r"|\b(?:this|the|following|given|my|your|below|above|provided|attached)\s+(?:[\w+#-]+\s+)?(?:code|program|"
    r"function|script|snippet|query|class|method|regex)\b"
    r"|[{};]\s*$|\bdef\s+\w+\(|=>|#include|\bconsole\.log|\bprint\(|"
    r"</?(?:div|span|p|html|body|head|script|style|a|img|ul|ol|li|table|tr|td|h[1-6]|form|input|button)\b|```",
    re.I | re.M)
# The first word of every program noun and language, for a set lookup that rules most prose out at once.
def _first_word(alternative: str) -> str:
    """``node\\.?js`` -> ``nodejs``, ``unit tests?`` -> ``unit``: the pattern's shortest spelling, first word."""
    plain = re.sub(r"\(\?:[^)]*\)\?|\\?.\?|\[sz\]", "", alternative)  # optional parts out
    return re.sub(r"\\(.)", r"\1", plain).split()[0]


_CODE_WORDS = frozenset(_first_word(alt) for alt in (_NOUN + "|" + _LANG).split("|"))
_WORDS = re.compile(r"[a-z0-9][a-z0-9+#.']*")
_CODE_SYNTAX = re.compile(r"[{};]\s*$|\bdef\s|=>|#include|console\.|print\(|<|```", re.M)

_ACTION = re.compile(
    _START + r"(?P<m>(?:go\s+to|walk\s+to|drive\s+to|travel\s+to|fly\s+to|run\s+to|visit|buy|purchase|pick\s+up|"
    r"call\s+(?!the\s+function|this\s+function|a\s+function|it\b|them\b|me\s+by|this\b|these\b)|"
    r"book\s+(?:a|an|the|me\s+a)\s+(?:table|flight|room|ticket|hotel|appointment|taxi|seat))\b)", re.I)

FOLLOWING_WORDS = 10  # "the following chart: <its data>" holds the content when this many words follow

_FRAGMENT = re.compile(r"^\s*(\.\.\.|…|[,;)\]}])")


@functools.lru_cache(maxsize=1024)  # each rule asks it about the same record
def is_code_task(instruction: str, inp: str = "") -> bool:
    """The task is about code (its answer is a program or markup, whatever it draws or reads)."""
    return _code(instruction) or (bool(inp) and _code(inp))


def _code(text: str) -> bool:
    # most prose names no program and no language: one cheap pass rules it out before the full pattern
    if _CODE_SYNTAX.search(text) is None and _CODE_WORDS.isdisjoint(
            w.rstrip(".'").replace(".", "") for w in _WORDS.findall(text.lower())):
        return False
    return _CODE.search(text) is not None


def _first(*patterns: re.Pattern, text: str) -> str | None:
    for p in patterns:
        for m in p.finditer(text):
            words = m.group("m") if m.group("m") is not None else m.group("m2")
            # "the following/below <thing>" followed by a passage: the content is there, as text
            if re.search(r"\b(following|below)\b", words, re.I) and len(text[m.end():].split()) >= FOLLOWING_WORDS:
                continue
            return " ".join(words.split())
    return None


def artifact_request(instruction: str, inp: str = "") -> str | None:
    """The words of a request for a non-text artifact (a drawing, a chart, a video), or None."""
    if is_code_task(instruction, inp):
        return None
    return _first(_DRAW, _PLOT, _MAKE, text=instruction)


def missing_content(instruction: str, inp: str = "") -> str | None:
    """The words that point at content the record does not hold, or None.

    Media (an image, a video, a recording) can never be in a text record. A document, a page or a link can:
    a pointer to one counts only when the input is empty (otherwise the input may be that document)."""
    if is_code_task(instruction, inp):
        return None
    text = f"{instruction}\n{inp}"
    hit = _first(_POINT_MEDIA, _ATTACHED, text=text)
    if hit:
        return hit
    if not inp.strip():
        hit = _first(_POINT_CONTAINER, text=instruction)
        if hit:
            return hit
    if _URL_ONLY.match(inp) and not _ABOUT_LINKS.search(instruction):
        return f"the input is only a link ({inp.strip()[:60]})"
    if _MEDIA_FILE_ONLY.match(inp) and not _ABOUT_LINKS.search(instruction):
        return f"the input is only a file name ({inp.strip()[:60]})"
    return None


def real_world_action(instruction: str) -> str | None:
    """The words of a request for a physical action (go somewhere, buy something), or None."""
    if is_code_task(instruction):
        return None
    return _first(_ACTION, text=instruction)


def leading_fragment(instruction: str) -> str | None:
    """An instruction that starts mid-sentence ("...and then", ", then"): the start of a record was lost."""
    m = _FRAGMENT.match(instruction)
    return m.group(1) if m else None
