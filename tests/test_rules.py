"""Every quality rule: one record it drops, one near-miss it keeps, and a switch that turns it off."""

import pytest

from pipeline.records import Instance, Task
from pipeline.text.rules import (InstanceRules, InstructionRules, check_instance, check_instruction,
                                 conflicting_inputs, normalize_empty_input)

# rule, dropped, kept near-miss, options that turn the rule off (or None)
INSTRUCTION_CASES = [
    ("too_short", "Sing a song.", "Sing a short song.", {"min_words": 3}),
    ("too_short", "   ", "Sing a short song.", None),
    ("too_long", "Explain " + "why " * 150, "Explain " + "why " * 149, {"max_words": 200}),
    ("blacklist", "Describe the image in detail.", "Describe the imagery of the poem.", {"blacklist": []}),
    ("blacklist", "Plot the data points for me.", "Plotting data points is fun: explain why.", {"blacklist": []}),
    ("blacklist", "Tell me how to go to the station.", "Tell me how to get to the station.", {"blacklist": []}),
    ("blacklist", "Compose some MUSIC for a birthday.", "Compose a musical limerick for a birthday.",
     {"blacklist": []}),
    ("blacklist", "Write a flowchart of the login process.", "Write the steps of the login process.",
     {"blacklist": []}),
    ("write_a_program", "Write a program to sort numbers.", "Write a poem about sorting numbers.",
     {"reject_write_a_program": False}),
    ("leading_punctuation", "- Give three tips for sleep.", "Give three tips for sleep - quickly.",
     {"reject_leading_punctuation": False}),
    ("non_ascii_start", "Élaborate on three tips for sleep.", "Elaborate on three tips for sleep, s'il vous plaît.",
     {"reject_non_ascii_start": False}),
]


@pytest.mark.parametrize("rule,bad,good,off", INSTRUCTION_CASES)
def test_instruction_rule(rule, bad, good, off):
    hit = check_instruction(bad, InstructionRules())
    assert hit is not None and hit.rule == rule and hit.reason
    assert check_instruction(good, InstructionRules()) is None
    if off is not None:
        assert check_instruction(bad, InstructionRules(**off)) is None


def test_extra_blacklist_is_word_bounded_and_case_insensitive():
    rules = InstructionRules(extra_blacklist=["spreadsheet", "log in"])
    assert check_instruction("Fill in the Spreadsheet with the totals.", rules).rule == "blacklist"
    assert check_instruction("Explain how to LOG IN to the account.", rules).rule == "blacklist"
    assert check_instruction("Explain how to login to the account.", rules) is None
    assert check_instruction("Fill in the spreadsheets with the totals.", rules) is None
    assert check_instruction("Fill in the spreadsheet with the totals.", InstructionRules()) is None


def test_default_blacklist_is_the_originals_plus_alpacas():
    words = set(InstructionRules().blacklist)
    assert {"image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
            "plot", "go to", "video", "audio", "music", "flowchart", "diagram"} == words


ASK = "Answer the question."
# rule, dropped, kept near-miss, options that turn the rule off
INSTANCE_CASES = [
    ("empty_output", Instance(input="x", output=" \n"), Instance(input="x", output="0"), {"empty_output": False}),
    ("placeholder_output", Instance(output="N/A"), Instance(output="N/A means not applicable."),
     {"placeholder_output": False}),
    ("placeholder_output", Instance(output="<nooutput>"), Instance(output="no output is given here"),
     {"placeholder_outputs": []}),
    ("placeholder_output", Instance(output="None."), Instance(output="None of them."), {"placeholder_output": False}),
    ("input_equals_output", Instance(input="hello there", output="hello there"),
     Instance(input="hello there", output="Hello there."), {"input_equals_output": False}),
    ("trailing_colon", Instance(input="Items:", output="ok"), Instance(input="Items: milk", output="ok"),
     {"trailing_colon": False}),
    ("trailing_colon", Instance(output="The answer is:"), Instance(output="The answer is: 4"),
     {"trailing_colon": False}),
    ("url_input", Instance(input="www.example.com/page", output="A page."),
     Instance(input="example dot com", output="A page."), {"url_input": False}),
    ("url_input", Instance(input="Read https://example.org/a?b=1 please", output="Done."),
     Instance(input="Read the https protocol spec please", output="Done."), {"url_input": False}),
    ("attachment_input", Instance(input="See the attached file for details.", output="ok"),
     Instance(input="See the details below.", output="ok"), {"attachment_input": False}),
    ("attachment_input", Instance(input="scan_001.png", output="A receipt."),
     Instance(input="scan 001 png", output="A receipt."), {"attachment_input": False}),
    ("merged_item", Instance(output="Paris.\n2. Instruction: Name a river."),
     Instance(output="Paris. The instruction was clear."), {"merged_item": False}),
    ("merged_item", Instance(output="Paris.\nInstruction: Name a river."),
     Instance(output="Paris, as the instruction: asked."), {"merged_item": False}),
    ("merged_item", Instance(output="Paris.\n\n### Instruction\nName a river."),
     Instance(output="Paris. ## Instructions follow."), {"merged_item": False}),
    ("input_too_long", Instance(input="a " * 401, output="ok"), Instance(input="a " * 400, output="ok"),
     {"max_input_words": None}),
    ("output_too_long", Instance(output="the " * 801), Instance(output="the " * 800), {"max_output_words": None}),
    ("not_english",
     Instance(input="", output="Это очень длинный ответ на русском языке без английских слов вообще."),
     Instance(output="This is a long answer in English with the usual small words in it."), {"language_check": False}),
]


@pytest.mark.parametrize("rule,bad,good,off", INSTANCE_CASES, ids=[c[0] for c in INSTANCE_CASES])
def test_instance_rule(rule, bad, good, off):
    hit = check_instance(ASK, bad, InstanceRules())
    assert hit is not None and hit.rule == rule and hit.reason
    assert check_instance(ASK, good, InstanceRules()) is None
    assert check_instance(ASK, bad, InstanceRules(**off)) is None


def test_classification_label_rule():
    labels = {"positive", "negative"}
    rules = InstanceRules()
    assert check_instance("Rate it.", Instance(input="x", output="Maybe"), rules, True, labels).rule == "unknown_label"
    assert check_instance("Rate it.", Instance(input="x", output="Positive"), rules, True, labels) is None
    assert check_instance("Rate it.", Instance(input="x", output="Maybe"), rules, False, labels) is None
    assert check_instance("Rate it.", Instance(input="x", output="Maybe"), rules, True, None) is None
    off = InstanceRules(classification_labels=False)
    assert check_instance("Rate it.", Instance(input="x", output="Maybe"), off, True, labels) is None


@pytest.mark.parametrize("marker", ["<noinput>", "<no input>", "No input", "No input.", "N/A", "None", "none",
                                    "(none)", "Noinput.", "noinput", "  <NoInput>  ", ""])
def test_empty_input_markers_become_empty(marker):
    assert normalize_empty_input(marker) == ""


@pytest.mark.parametrize("text", ["None of the above", "No input was given by the user", "n/a/b", "0", "-5"])
def test_real_inputs_are_kept(text):
    assert normalize_empty_input(text) == text


def test_conflicting_inputs():
    t = Task(id="t", instruction="x", instances=[Instance(input="a", output="1"), Instance(input="a ", output="2")])
    assert conflicting_inputs(t) == "a"
    same = Task(id="t", instruction="x", instances=[Instance(input="a", output="1"), Instance(input="a", output="1")])
    assert conflicting_inputs(same) is None
    other = Task(id="t", instruction="x", instances=[Instance(input="a", output="1"), Instance(input="b", output="2")])
    assert conflicting_inputs(other) is None


@pytest.mark.parametrize("text,code", [
    ("Write a Python function that reads a file and counts its lines.", True),
    ("Write a Node.js server that answers every request with its path.", True),
    ("How would you implement a JavaScript function that reverses a string?", True),
    ("Explain what this SQL query does.", True),
    ("Find the bug in the following code.", True),
    ("Plot the graph of y = x^2 using matplotlib.", True),
    ("Create a bar chart of the monthly sales in Python.", True),
    ("Watch the video about Django and summarize it.", False),
    ("Draw a picture of a programming robot for my classroom.", False),
    ("Summarize the article about the Rust belt at this link.", False),
    ("List the steps for planning a React meetup.", False),
])
def test_a_code_task_asks_for_or_holds_code_a_mentioned_word_is_not_enough(text, code):
    from pipeline.text import defects

    assert defects.is_code_task(text) is code
    # the quick word lookup in front of the full pattern never changes its answer
    assert defects._code(text) is (defects._CODE.search(text) is not None)
