"""The text protocol: fences, output blocks, answers and verdicts (pure functions)."""

from __future__ import annotations

from duet.agents.protocol import (
    NO_OUTPUT,
    STATE_LOST_NOTE,
    TRUNCATED,
    clip,
    extract_final_answer,
    find_code_blocks,
    format_cell,
    format_output,
    output_block,
    parse_verdict,
    prose,
    trim_traceback,
)

TRACEBACK = """Traceback (most recent call last):
  File "/tmp/sandbox/runner.py", line 40, in run
    exec(code, namespace)
  File "<cell 2>", line 3, in <module>
    total = price / count
            ~~~~~~^~~~~~~
ZeroDivisionError: division by zero
"""


def test_find_code_blocks_by_lines():
    text = 'Step.\n```python\ns = "```python"\nprint(s)\n```\nmore\n```py\nx = 1\n```\n'
    blocks = find_code_blocks(text)
    assert [b.code for b in blocks] == ['s = "```python"\nprint(s)', "x = 1"]
    assert all(b.closed for b in blocks)
    assert text[blocks[0].start :].startswith("```python\ns =")
    assert text[: blocks[1].end].endswith("x = 1\n```\n")


def test_other_fences_are_skipped_and_unclosed_blocks_flagged():
    text = "```text\n```python\nnot code\n```\n```python\nx = 1\n"
    blocks = find_code_blocks(text)
    assert len(blocks) == 1 and blocks[0].code == "x = 1" and not blocks[0].closed
    assert find_code_blocks("```output\n```python\n```\n") == []


def test_prose_drops_code_and_output_blocks():
    text = "A\n```python\nprint('\\\\boxed{9}')\n```\n```output\n\\boxed{9}\n```\nB \\boxed{4}\n"
    assert prose(text) == "A\nB \\boxed{4}\n"
    assert extract_final_answer(text) == "4"
    assert extract_final_answer("```python\nx = '\\\\boxed{1}'\n```\n") is None


def test_output_block_and_cell_exact_text():
    assert output_block("4") == "```output\n4\n```\n"
    cell = format_cell("Add.", "print(2 + 2)", "4")
    assert cell == "Add.\n```python\nprint(2 + 2)\n```\n```output\n4\n```\n"


def test_format_output_plain_empty_and_state_lost():
    assert format_output("71\n") == "71"
    assert format_output("") == NO_OUTPUT
    assert format_output("1\n", state_lost=True) == f"{STATE_LOST_NOTE}\n1"


def test_format_output_error_is_trimmed_to_the_last_frame():
    out = format_output("partial\n", TRACEBACK, "ZeroDivisionError: division by zero", ok=False)
    assert out == (
        'partial\n  File "<cell 2>", line 3, in <module>\n    total = price / count\n'
        "ZeroDivisionError: division by zero"
    )
    timeout = "TimeoutError: cell ran longer than 5 s"
    assert trim_traceback("", timeout) == timeout
    assert trim_traceback("", None) == "Error"
    note = "[sandbox] a fresh session started: the previous one ended; variables are gone.\n"
    assert format_output("", note, "timed out after 5 s", ok=False, state_lost=True) == (
        f"{STATE_LOST_NOTE}\ntimed out after 5 s"
    )


def test_format_output_caps_long_output_keeping_head_and_tail():
    stdout = "\n".join(f"line {i}" for i in range(500))
    out = format_output(stdout, "", "ValueError: bad", ok=False)
    assert len(out) <= 1000 + len(TRUNCATED) + 2
    assert out.startswith("line 0\nline 1\n") and f"\n{TRUNCATED}\n" in out
    assert out.endswith("line 499\nValueError: bad")
    assert clip("short") == "short"


def test_format_output_marks_sandbox_truncation_and_escapes_fences():
    assert format_output("abc", truncated=True) == f"abc\n{TRUNCATED}"
    # a flood the sandbox cut: whole lines from the start and one marker, no cut-off last line (QA: "12" of 12774)
    flood = "\n".join(map(str, range(100_000)))[:65_536]
    out = format_output(flood, truncated=True)
    assert out.count(TRUNCATED) == 1 and out.endswith(f"\n{TRUNCATED}") and out.startswith("0\n1\n")
    shown = out.removesuffix(f"\n{TRUNCATED}").split("\n")
    assert shown == [str(i) for i in range(len(shown))] and len(out) <= 1000 + len(TRUNCATED) + 1
    assert format_output("```\nx\n```") == "'''\nx\n'''"


def test_parse_verdict_lenient_and_deterministic():
    assert parse_verdict("work\nVERDICT: AGREE\n\\boxed{4}").kind == "agree"
    verdict = parse_verdict("VERDICT: DISAGREE: 23 + 48 is 71, not 73.")
    assert (verdict.kind, verdict.reason) == ("disagree", "23 + 48 is 71, not 73.")
    assert parse_verdict("verdict disagree - wrong units").reason == "wrong units"
    assert parse_verdict("VERDICT: DISAGREE: it is 71. \\boxed{71}").reason == "it is 71."
    assert parse_verdict("**Verdict:** Agree").kind == "agree"
    assert parse_verdict("VERDICT:DISAGREE").reason == ""
    assert parse_verdict("VERDICT: AGREE\nthen\nVERDICT: DISAGREE: no").kind == "disagree"  # the last one
    assert parse_verdict("I agree with the verdict.").kind == "none"
    assert parse_verdict("```python\nprint('VERDICT: AGREE')\n```\n").kind == "none"
