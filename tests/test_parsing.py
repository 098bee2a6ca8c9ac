"""A corpus of realistic bad completions; each case states exactly what must be kept."""

import pytest

from pipeline.text.parsing import (parse_alpaca, parse_input_first, parse_instruction_list, parse_json_items,
                                   parse_output_first, parse_yes_no)

LIST_CASES = [
    # (name, completion, truncated, kept, dropped rules)
    ("clean", " Write a haiku about rain.\n10. List three uses of vinegar.\n11. Explain tides to a child.",
     False, ["Write a haiku about rain.", "List three uses of vinegar.", "Explain tides to a child."], []),
    ("skipped and repeated numbers", " Name a planet.\n12. Describe a sunset in French.\n12. Plan a picnic menu.\n"
     "15. Summarize a news story.", False,
     ["Name a planet.", "Describe a sunset in French.", "Plan a picnic menu.", "Summarize a news story."], []),
    ("truncated last item", " Give two tips for sleep.\n10. Translate the phrase into Spa", True,
     ["Give two tips for sleep."], ["truncated"]),
    ("merged item header", " Sort the words.\n10. Output: apple, pear\n11. Rewrite the email politely.", False,
     ["Sort the words.", "Rewrite the email politely."], ["malformed_item"]),
    ("case is kept", " Describe NASA's role in the Apollo program.", False,
     ["Describe NASA's role in the Apollo program."], []),
    ("stop string inside content", " Explain why 16. is not a prime number.\n10. Count to 20.", False,
     ["Explain why 16. is not a prime number.", "Count to 20."], []),
]


@pytest.mark.parametrize("name,text,truncated,kept,dropped", LIST_CASES, ids=[c[0] for c in LIST_CASES])
def test_instruction_lists(name, text, truncated, kept, dropped):
    r = parse_instruction_list(text, truncated)
    assert r.items == kept
    assert [d.rule for d in r.dropped] == dropped


def test_ten_items_one_malformed_keeps_nine():
    items = [f"Write task number {i} about topic {i}." for i in range(10)]
    lines = [items[0]] + [f"{i + 10}. {t}" for i, t in enumerate(items[1:], 1)]
    lines[4] = "14. Input: this line is a stray header"
    r = parse_instruction_list(" " + "\n".join(lines), truncated=False)
    assert len(r.items) == 9 and len(r.dropped) == 1


def test_first_line_only():
    r = parse_instruction_list(" Name three rivers.\nThe Nile is long.", False, first_line_only=True)
    assert r.items == ["Name three rivers."]


def test_input_first_examples_and_empty_input_markers():
    text = ("Input: 2 + 2\nOutput: 4\n\nExample 2\nInput: <noinput>\nOutput: Hello\n\nExample 3\nInput: No input\n"
            "Output: Hi\n\nExample 4\nOutput: just output\n\nExample 5\nInput: x")
    r = parse_input_first(text, truncated=False)
    assert r.items == [("2 + 2", "4"), ("", "Hello"), ("", "Hi"), ("", "just output")]
    assert [d.rule for d in r.dropped] == ["malformed_item"]


def test_input_first_merged_and_truncated():
    text = "Input: a\nOutput: b\nInput: c\nOutput: d\n\nExample 2\nInput: e\nOutput: f\n\nExample 3\nInput: g\nOut"
    r = parse_input_first(text, truncated=True)
    assert r.items == [("e", "f")]
    assert sorted(d.rule for d in r.dropped) == ["merged_item", "truncated"]


def test_output_first():
    text = " Positive\nInput: Loved it.\nClass label: Negative\nInput: Broken on arrival.\nClass label: Neutral\n"
    r = parse_output_first(text, truncated=False)
    assert r.items == [("Loved it.", "Positive"), ("Broken on arrival.", "Negative")]
    assert [d.rule for d in r.dropped] == ["malformed_item"]


def test_alpaca_blocks():
    text = (" Give a tip.\n4. Input:\n<noinput>\n4. Output:\nDrink water.\n###\n5. Instruction: Add numbers.\n5. Input:\n"
            "1, 2\n5. Output:\n3\n5. Instruction: merged\n###\n6. Instruction: no output here\n###\n7. Instruction: Cut")
    r = parse_alpaca(text, truncated=True)
    assert [(i.instruction, i.input, i.output) for i in r.items] == [("Give a tip.", "", "Drink water.")]
    assert sorted(d.rule for d in r.dropped) == ["malformed_item", "merged_item", "truncated"]


@pytest.mark.parametrize("text", [
    '```json\n[{"instruction": "Name a color.", "input": "", "output": "Blue"}]\n```',
    'Here you go:\n[{"instruction": "Name a color.", "input": "N/A", "output": "Blue"}]\nLet me know if you need more!',
    '{"tasks": [{"instruction": "Name a color.", "output": "Blue"}]}',
])
def test_json_wrapped_and_trailing_prose(text):
    r = parse_json_items(text)
    assert [(i.instruction, i.input, i.output) for i in r.items] == [("Name a color.", "", "Blue")]


def test_json_bad_item_drops_only_itself_and_no_json_falls_back():
    r = parse_json_items('[{"instruction": "Ok task here."}, {"input": "no instruction"}, "A plain string task."]')
    assert [i.instruction for i in r.items] == ["Ok task here.", "A plain string task."]
    assert len(r.dropped) == 1
    assert parse_json_items("1. not json at all") is None


def test_yes_no():
    assert parse_yes_no(" Yes\n") is True and parse_yes_no("no.") is False and parse_yes_no("Maybe") is None
