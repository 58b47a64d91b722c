"""Prompt templates: the built-in files, user overrides and placeholder checks."""

from __future__ import annotations

import pytest

from duet.prompts import BUILTIN_DIR, PLACEHOLDERS, PromptError, fill, load_prompts


def test_builtin_prompts_load_and_are_short():
    prompts = load_prompts()
    for name in PLACEHOLDERS:
        text = getattr(prompts, name)
        assert (BUILTIN_DIR / f"{name}.md").is_file()
        assert len(text.split()) <= 70, f"{name} is too long for a small model"
    assert "```python" in prompts.solver_system and "\\boxed{" in prompts.solver_system
    assert "VERDICT: AGREE" in prompts.critic_system and "VERDICT: DISAGREE:" in prompts.critic_system


def test_fill_is_literal_and_single_pass():
    filled = fill(r"Q: {question} \boxed{answer} {x}", question="{solution} 1/2")
    assert filled == r"Q: {solution} 1/2 \boxed{answer} {x}"
    prompts = load_prompts()
    request = prompts.critic_request("What is 2+2?", "It is \\boxed{4}.")
    assert "What is 2+2?" in request and "It is \\boxed{4}." in request
    assert "bad step" in prompts.revise_request("bad step")
    assert prompts.solver_question("Q?") == "Q?"


def test_user_directory_overrides_a_subset(tmp_path):
    (tmp_path / "solver_system.md").write_text("Be brief.\n")
    (tmp_path / "notes.txt").write_text("ignored")
    prompts = load_prompts(tmp_path)
    assert prompts.solver_system == "Be brief."
    assert prompts.critic_system == load_prompts().critic_system


def test_clear_errors(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "nope")
    (tmp_path / "critic_user.md").write_text("Problem: {question}\n")
    with pytest.raises(PromptError, match=r"critic_user.md: missing placeholder \{solution\}"):
        load_prompts(tmp_path)
    (tmp_path / "critic_user.md").unlink()
    (tmp_path / "solver_sytem.md").write_text("typo")
    with pytest.raises(PromptError, match="solver_sytem.md: unknown prompt file"):
        load_prompts(tmp_path)
    (tmp_path / "solver_sytem.md").unlink()
    (tmp_path / "revise_user.md").write_text("  \n")
    with pytest.raises(PromptError, match="empty template"):
        load_prompts(tmp_path)
