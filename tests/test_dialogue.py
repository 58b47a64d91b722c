"""The solver-critic dialogue, every branch driven by scripted backends and the real sandbox."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from duet.agents.backends import BackendError, ContextFullError, Request, ScriptedBackend
from duet.agents.critic import GENERIC_DISAGREE, NO_ANSWER_REASON, NO_VERDICT_REASON
from duet.agents.dialogue import STOP_REASONS, Dialogue, DialogueConfig, run_dialogue
from duet.agents.events import EVENT_KINDS, Event
from duet.agents.protocol import NO_CODE, STEP_LIMIT_NOTE, STOP
from duet.agents.transcript import DialogueResult

QUESTION = "A baker has 23 loaves and bakes 4 trays of 12 more. How many loaves does he have?"

RIGHT = """Count the baked loaves, then add the 23.
```python
baked = 4 * 12
print(baked)
```
```output
48
```
Add them.
```python
total = 23 + baked
total
```
```output
71
```
He has \\boxed{71} loaves."""

WRONG = """Add everything.
```python
print(23 + 4 * 12 + 2)
```
```output
73
```
So \\boxed{73}."""

AGREE = """Recompute another way.
```python
print(sum([23] + [12] * 4))
```
```output
71
```
VERDICT: AGREE
\\boxed{71}"""

DISAGREE = """Recompute.
```python
print(23 + 48)
```
```output
71
```
VERDICT: DISAGREE: 23 + 4*12 is 71, not 73.
\\boxed{71}"""


def cell(text: str, code: str) -> str:
    """One scripted step: prose, a code block and a placeholder output block (duet writes the real one)."""
    return f"{text}\n```python\n{code}\n```\n```output\n(placeholder)\n```\n"


def config(**overrides) -> DialogueConfig:
    base = {"sandbox_timeout": 5.0, "max_tokens": 400}
    return DialogueConfig(**{**base, **overrides})


class Recorder:
    """Collects events."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self, agent: str | None = None) -> list[str]:
        return [e.kind for e in self.events if e.kind != "delta" and agent in (None, e.agent)]

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


def test_agreement_in_round_one_with_events_and_real_outputs():
    events = Recorder()
    solver, critic = ScriptedBackend([RIGHT]), ScriptedBackend([AGREE])
    result = run_dialogue(QUESTION, solver, critic, config(), on_event=events)
    assert (result.answer, result.agreed, result.rounds, result.stop_reason) == ("71", True, 1, "agreed")
    assert events.kinds("solver") == [
        "turn_start",
        "step",
        "code",
        "output",
        "step",
        "code",
        "output",
        "step",
        "answer",
        "turn_end",
    ]
    assert events.kinds("critic") == ["turn_start", "step", "code", "output", "step", "verdict", "turn_end"]
    assert events.kinds("dialogue") == ["done"]
    assert {e.kind for e in events.events} <= set(EVENT_KINDS)
    assert [e.text for e in events.of("output")] == ["48", "71", "71"]  # the echo of `total` is shown
    deltas = "".join(e.text for e in events.events if e.kind == "delta" and e.agent == "solver")
    assert "```python" in deltas and "(placeholder)" not in deltas and STOP not in deltas
    solver_turn = result.turns[0]
    assert "```output\n48\n```\nAdd them." in solver_turn.text and "(placeholder)" not in solver_turn.text
    assert [s.output for s in solver_turn.steps] == ["48", "71"] and solver_turn.finish == "eos"
    # the critic saw the problem and the solver's whole solution, with the real outputs
    critic_prompt = critic.calls[0].messages[-1]["content"]
    assert QUESTION in critic_prompt and solver_turn.text in critic_prompt
    assert result.turns[1].verdict == "agree" and result.turns[1].answer == "71"
    assert result.completion_tokens == sum(t.completion_tokens for t in result.turns) > 0
    assert result.solver_model == "scripted" and result.critic_model == "scripted"


def test_continuation_requests_carry_the_partial_assistant_message():
    solver = ScriptedBackend([RIGHT])
    run_dialogue(QUESTION, solver, config=config(critic=False))
    first, second, third = solver.calls
    assert first.messages[-1]["role"] == "user" and first.request.stop == (STOP,)
    assert second.messages[-1] == {
        "role": "assistant",
        "content": "Count the baked loaves, then add the 23.\n```python\nbaked = 4 * 12\nprint(baked)\n```\n"
        "```output\n48\n```\n",
    }
    assert third.messages[-1]["content"].endswith("total\n```\n```output\n71\n```\n")
    assert first.request.max_tokens == 400 and second.request.max_tokens < 400  # the turn's token limit shrinks


def test_disagreement_then_fix():
    events = Recorder()
    solver, critic = ScriptedBackend([WRONG, RIGHT]), ScriptedBackend([DISAGREE, AGREE])
    dialogue = Dialogue(solver, critic, config(), on_event=events)
    result = dialogue.run(QUESTION)
    assert (result.answer, result.agreed, result.rounds, result.stop_reason) == ("71", True, 2, "agreed")
    assert [(t.agent, t.round, t.task) for t in result.turns] == [
        ("solver", 1, "solve"),
        ("critic", 1, "critique"),
        ("solver", 2, "revise"),
        ("critic", 2, "critique"),
    ]
    roles = [m["role"] for m in dialogue.solver.conversation]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    revise = dialogue.solver.conversation[3]["content"]
    assert "23 + 4*12 is 71, not 73. (the checker's answer: 71)" in revise
    assert [e.text for e in events.of("verdict")] == ["disagree", "agree"]
    assert events.of("verdict")[0].data["reason"] == "23 + 4*12 is 71, not 73."


def test_never_agreeing_stops_at_max_rounds_with_the_solvers_last_answer():
    wrong = [WRONG.replace("+ 2", f"+ {k}").replace("73", str(71 + k)) for k in (2, 3, 4)]
    result = run_dialogue(
        QUESTION, ScriptedBackend(wrong), ScriptedBackend([DISAGREE] * 3), config(max_rounds=3)
    )
    assert (result.stop_reason, result.agreed, result.rounds, result.answer) == ("max_rounds", False, 3, "75")
    assert len(result.turns) == 6


def test_code_error_is_shown_and_fixed():
    script = cell("Compute.", "print(loaves + 48)") + cell(
        "Define it first.", "loaves = 23\nprint(loaves + 48)"
    )
    solver = ScriptedBackend([script + "\\boxed{71}"])
    result = run_dialogue(QUESTION, solver, config=config(critic=False))
    assert (result.stop_reason, result.answer) == ("no_critic", "71")
    first, second = result.turns[0].steps
    assert not first.ok and first.error and "NameError" in first.error
    assert first.output.endswith("NameError: name 'loaves' is not defined")
    assert "Traceback" not in first.output and len(first.output.splitlines()) <= 4
    assert (second.ok, second.output) == (True, "71")
    assert solver.calls[1].messages[-1]["content"].endswith(f"```output\n{first.output}\n```\n")


def test_state_persists_within_a_turn_but_not_across_turns():
    critic_script = cell("Is x still here?", "print('x' in globals())") + "VERDICT: AGREE"
    solver = ScriptedBackend([cell("Set.", "x = 5") + cell("Use.", "print(x * 2)") + "\\boxed{10}"])
    result = run_dialogue("2*5?", solver, ScriptedBackend([critic_script]), config())
    assert [s.output for s in result.turns[0].steps] == ["(no output)", "10"]
    assert result.turns[1].steps[0].output == "False"


def test_no_final_answer():
    no_answer = cell("Compute.", "print(71)") + "The baker has many loaves."
    result = run_dialogue(QUESTION, ScriptedBackend([no_answer]), config=config(critic=False))
    assert (result.stop_reason, result.answer, result.agreed) == ("no_answer", None, False)
    events = Recorder()
    critic = ScriptedBackend([])
    result = run_dialogue(
        QUESTION,
        ScriptedBackend([no_answer, "Still thinking."]),
        critic,
        config(max_rounds=2),
        on_event=events,
    )
    assert (result.stop_reason, result.answer, result.rounds) == ("no_answer", None, 2)
    assert critic.calls == []  # nothing to check: the solver is asked for an answer instead
    assert NO_ANSWER_REASON in result.turns[1].messages[-1]["content"]
    assert [e.data["reason"] for e in events.of("error")] == ["no_answer", "no_answer"]


def test_a_model_that_never_writes_code():
    result = run_dialogue(
        QUESTION, ScriptedBackend(["23 + 48 = 71, so \\boxed{71}."]), ScriptedBackend([AGREE])
    )
    assert (result.stop_reason, result.answer) == ("agreed", "71")
    assert result.turns[0].steps == []


def test_nested_fence_inside_a_string_is_code():
    code = 'fence = "```python"\nprint(len(fence), "```")'
    result = run_dialogue(
        "?", ScriptedBackend([cell("Fences.", code) + "\\boxed{9}"]), config=config(critic=False)
    )
    step = result.turns[0].steps[0]
    assert step.code == code and step.ok and step.output == "9 '''"  # fences in outputs are neutralised


def test_unterminated_block_at_the_end_is_not_run():
    events = Recorder()
    script = "I will compute.\n```python\nprint(71)\n"
    result = run_dialogue("?", ScriptedBackend([script]), config=config(critic=False), on_event=events)
    assert result.turns[0].steps == [] and result.stop_reason == "no_answer"
    assert "unterminated code block" in events.of("error")[0].text


def test_stop_string_glued_to_the_code_is_closed_canonically():
    solver = ScriptedBackend(["Go.\n```python\nprint(6 * 7)\n```output\n42\n```\n\\boxed{42}"])
    result = run_dialogue("?", solver, config=config(critic=False))
    assert result.turns[0].text == "Go.\n```python\nprint(6 * 7)\n```\n```output\n42\n```\n\\boxed{42}"


def test_a_closed_block_at_end_of_turn_is_run_and_generation_continues():
    # a server that does not report the stop string: the text simply ends after the code block
    solver = _NoStopBackend(["Go.\n```python\nprint(6 * 7)\n```\n", "\\boxed{42}"])
    result = run_dialogue("?", solver, config=config(critic=False))
    assert result.answer == "42" and result.turns[0].steps[0].output == "42"


class _NoStopBackend(ScriptedBackend):
    """Serves each reply whole, ignoring stop strings and continuations (a forgetful server)."""

    def complete(self, messages, request=Request(), **kw):
        return super().complete([m for m in messages if m["role"] != "assistant"], replace(request, stop=()), **kw)


def test_output_without_code_and_the_step_limit():
    stray = "Let me see.\n```output\n(placeholder)\n```\n\\boxed{1}"
    result = run_dialogue("?", ScriptedBackend([stray]), config=config(critic=False))
    assert result.turns[0].steps[0].output == NO_CODE and result.answer == "1"
    loop = "".join(cell(f"Step {i}.", f"print({i})") for i in range(6))
    result = run_dialogue("?", ScriptedBackend([loop]), config=config(critic=False, max_steps=3))
    turn = result.turns[0]
    assert turn.finish == "max_steps" and [s.output for s in turn.steps] == ["0", "1", "2", STEP_LIMIT_NOTE]
    assert result.stop_reason == "no_answer"


def test_critic_on_another_backend():
    solver = ScriptedBackend([RIGHT], name="small-solver")
    critic = ScriptedBackend([AGREE], name="big-critic")
    result = run_dialogue(QUESTION, solver, critic, config())
    assert (result.solver_model, result.critic_model) == ("small-solver", "big-critic")
    assert [t.model for t in result.turns] == ["small-solver", "big-critic"]
    assert len(solver.calls) == 3 and len(critic.calls) == 2


def test_critic_defaults_to_the_solver_backend():
    shared = ScriptedBackend([RIGHT, AGREE])
    result = run_dialogue(QUESTION, shared, config=config())
    assert result.stop_reason == "agreed" and result.critic_model == "scripted"


def test_agreement_by_equivalent_answers_despite_disagree():
    critic = DISAGREE.replace("\\boxed{71}", "\\boxed{71.0 loaves}")
    result = run_dialogue(QUESTION, ScriptedBackend([RIGHT]), ScriptedBackend([critic]), config())
    assert (result.stop_reason, result.agreed, result.answer) == ("agreed", True, "71")


def test_no_verdict_and_disagree_without_reason_revise_with_generic_reasons():
    dialogue = Dialogue(
        ScriptedBackend([WRONG, WRONG.replace("73", "74").replace("+ 2", "+ 3"), RIGHT]),
        ScriptedBackend(["I am not sure.", "VERDICT: DISAGREE", AGREE]),
        config(),
    )
    result = dialogue.run(QUESTION)
    assert (result.stop_reason, result.rounds) == ("agreed", 3)
    assert [t.verdict for t in result.critic_turns] == ["none", "disagree", "agree"]
    revisions = [m["content"] for m in dialogue.solver.conversation if m["role"] == "user"][1:]
    assert NO_VERDICT_REASON in revisions[0] and GENERIC_DISAGREE in revisions[1]


def test_repeated_identical_reply_stops():
    result = run_dialogue(QUESTION, ScriptedBackend([WRONG, WRONG]), ScriptedBackend([DISAGREE]), config())
    assert (result.stop_reason, result.rounds, result.answer, result.agreed) == (
        "repeated_reply",
        2,
        "73",
        False,
    )
    assert len(result.turns) == 3  # the repeat is not checked again


def test_token_budget():
    result = run_dialogue(
        QUESTION, ScriptedBackend([RIGHT]), ScriptedBackend([AGREE]), config(token_budget=12)
    )
    assert result.stop_reason == "token_budget" and result.completion_tokens <= 12
    assert result.turns[0].finish == "token_budget" and len(result.turns) == 1


def test_per_turn_max_tokens():
    result = run_dialogue(QUESTION, ScriptedBackend([RIGHT]), config=config(max_tokens=10, critic=False))
    assert result.turns[0].finish == "length" and result.stop_reason == "no_answer"


def test_backend_errors_end_cleanly():
    result = run_dialogue(
        QUESTION, ScriptedBackend([BackendError("server down\nfor maintenance")]), config=config()
    )
    assert (result.stop_reason, result.answer, result.error) == (
        "backend_error",
        None,
        "server down for maintenance",
    )
    result = run_dialogue(
        QUESTION, ScriptedBackend([RIGHT]), ScriptedBackend([RuntimeError("bug")]), config()
    )
    assert (result.stop_reason, result.answer, result.error) == ("backend_error", "71", "RuntimeError: bug")


def test_backend_timeout():
    slow = ScriptedBackend([RIGHT], delay=30, timeout=0.1)
    result = run_dialogue(QUESTION, slow, config=config())
    assert result.stop_reason == "backend_error" and result.error == "scripted: no reply within 0.1 s"


def test_sandbox_timeout_inside_a_step_is_shown_to_the_model():
    script = cell("Loop.", "while True:\n    pass") + cell("Simpler.", "print(71)") + "\\boxed{71}"
    result = run_dialogue(
        QUESTION, ScriptedBackend([script]), config=config(critic=False, sandbox_timeout=0.5)
    )
    slow, fixed = result.turns[0].steps
    assert not slow.ok and "time" in slow.output.lower()
    assert fixed.output.endswith("71") and result.answer == "71"


def test_sandbox_that_cannot_start():
    def broken():
        raise OSError("no processes left")

    result = run_dialogue(QUESTION, ScriptedBackend([RIGHT]), config=config(), sandbox_factory=broken)
    assert result.stop_reason == "sandbox_error" and "no processes left" in result.error


def test_cancel_between_steps():
    cancel = threading.Event()

    def on_event(event: Event) -> None:
        if event.kind == "output":
            cancel.set()

    result = run_dialogue(
        QUESTION, ScriptedBackend([RIGHT]), config=config(), on_event=on_event, cancel=cancel
    )
    assert result.stop_reason == "interrupted" and len(result.turns[0].steps) == 1
    cancel = threading.Event()
    cancel.set()
    result = run_dialogue(QUESTION, ScriptedBackend([RIGHT]), config=config(), cancel=cancel)
    assert result.stop_reason == "interrupted" and result.turns[0].text == ""


def test_cancel_during_generation():
    cancel = threading.Event()

    def on_event(event: Event) -> None:
        if event.kind == "delta" and "baked" in event.text:
            cancel.set()

    result = run_dialogue(
        QUESTION, ScriptedBackend([RIGHT]), config=config(), on_event=on_event, cancel=cancel
    )
    assert result.stop_reason == "interrupted" and result.turns[0].steps == []


def test_a_stopped_critic_turn_shows_no_verdict():
    """Ctrl-C during the critic's check printed "? the critic gave no verdict" (QA): it was stopped, not silent."""
    cancel, events = threading.Event(), []

    def on_event(event: Event) -> None:
        events.append(event)
        if event.kind == "delta" and event.agent == "critic":
            cancel.set()

    result = run_dialogue(QUESTION, ScriptedBackend([RIGHT]), ScriptedBackend([AGREE]), config(), on_event=on_event,
                          cancel=cancel)
    assert result.stop_reason == "interrupted" and result.turns[-1].agent == "critic"
    assert not [e for e in events if e.kind == "verdict"]


def test_a_failing_event_callback_does_not_stop_the_dialogue():
    def on_event(event: Event) -> None:
        raise ValueError("renderer bug")

    result = run_dialogue(
        QUESTION, ScriptedBackend([RIGHT]), ScriptedBackend([AGREE]), config(), on_event=on_event
    )
    assert result.stop_reason == "agreed"


def test_follow_up_questions_reuse_the_conversation():
    solver = ScriptedBackend([RIGHT, "Half of 71 is \\boxed{35.5}."])
    critic = ScriptedBackend([AGREE, "VERDICT: AGREE"])
    dialogue = Dialogue(solver, critic, config())
    assert dialogue.run(QUESTION).answer == "71"
    second = dialogue.run("And half of that?")
    assert (second.answer, second.turns[0].task) == ("35.5", "follow_up")
    assert [m["role"] for m in dialogue.solver.conversation] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert f"{QUESTION}\n\nFollow-up: And half of that?" in critic.calls[-1].messages[-1]["content"]


def test_transcript_json_round_trip(tmp_path):
    result = run_dialogue(
        QUESTION, ScriptedBackend([WRONG, RIGHT]), ScriptedBackend([DISAGREE, AGREE]), config()
    )
    data = json.loads(result.to_json())
    assert data["version"] == 1 and data["stop_reason"] == "agreed" and data["config"]["max_rounds"] == 3
    again = DialogueResult.from_json(result.to_json())
    assert again == result
    data["version"] = 2
    with pytest.raises(ValueError, match="unsupported transcript version 2"):
        DialogueResult.from_dict(data)


def test_stop_reasons_are_documented():
    import duet.agents.dialogue as module

    for reason in STOP_REASONS:
        assert f"``{reason}``" in module.__doc__


MISCOPIED = """Add the baked loaves.
```python
print(28 + 4 * 12)
```
```output
76
```
So \\boxed{76}."""


def test_number_check_rejects_a_miscopied_number_without_asking_the_critic_model():
    solver, critic = ScriptedBackend([MISCOPIED, RIGHT]), ScriptedBackend([AGREE])
    dialogue = Dialogue(solver, critic, config())
    result = dialogue.run(QUESTION)
    assert (result.answer, result.agreed, result.stop_reason) == ("71", True, "agreed")
    assert [(t.agent, t.task, t.model) for t in result.turns] == [
        ("solver", "solve", "scripted"), ("critic", "number_check", "duet:number-check"),
        ("solver", "revise", "scripted"), ("critic", "critique", "scripted")]
    check = result.turns[1]
    assert (check.verdict, check.answer, check.completion_tokens) == ("disagree", None, 0)
    assert critic.calls and all("28 + 4" not in c.messages[1]["content"] for c in critic.calls)  # only the revision
    revise = dialogue.solver.conversation[3]["content"]
    assert "the code uses 28 (did you mean 23?), not a number of the problem" in revise
    assert "checker's answer" not in revise


def test_a_number_is_questioned_once_then_the_critic_model_judges():
    solver, critic = ScriptedBackend([MISCOPIED, MISCOPIED + "\nI checked: 28."]), ScriptedBackend([DISAGREE])
    result = run_dialogue(QUESTION, solver, critic, config(max_rounds=2))
    assert [t.task for t in result.turns] == ["solve", "number_check", "revise", "critique"]
    assert (result.stop_reason, result.answer) == ("max_rounds", "76")


def test_number_check_can_be_turned_off():
    result = run_dialogue(QUESTION, ScriptedBackend([MISCOPIED]), ScriptedBackend([AGREE]),
                          config(number_check=False))
    assert [t.task for t in result.turns] == ["solve", "critique"] and result.stop_reason == "agreed"


def test_a_conversation_that_outgrows_the_context_ends_with_the_answer_so_far():
    full = ContextFullError("local:model: the prompt has 2063 tokens; the context holds 2048")
    result = run_dialogue(QUESTION, ScriptedBackend([WRONG, full]), ScriptedBackend([DISAGREE]), config())
    assert (result.stop_reason, result.answer, result.agreed) == ("context_full", "73", False)
    assert result.error == "local:model: the prompt has 2063 tokens; the context holds 2048"
    assert result.turns[-1].finish == "context_full"


def test_the_agents_read_numbers_in_words_as_digits_and_the_result_keeps_the_question_asked():
    asked = "A baker has twenty-three loaves and bakes four trays of twelve more. How many loaves?"
    for on, seen in ((True, "A baker has 23 loaves and bakes 4 trays of 12 more. How many loaves?"), (False, asked)):
        solver, critic = ScriptedBackend([RIGHT]), ScriptedBackend([AGREE])
        result = run_dialogue(asked, solver, critic, config(numbers_as_digits=on, number_check=False))
        assert result.question == asked
        assert solver.calls[0].messages[1]["content"] == seen
        assert seen in critic.calls[0].messages[1]["content"]
