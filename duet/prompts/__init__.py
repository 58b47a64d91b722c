"""The agents' prompt templates: short Markdown files, overridable from a user directory.

Files (all in this package; a user directory may override any subset, same names):

==================  ======================================  ==============================
file                used as                                 placeholders (all required)
==================  ======================================  ==============================
solver_system.md    the solver's system message             (none)
solver_user.md      the user message carrying a question    ``{question}``
critic_system.md    the critic's system message             (none)
critic_user.md      the critic's user message               ``{question}``, ``{solution}``
revise_user.md      the user message asking for a revision  ``{critique}``
verifier_user.md    the critic's yes/no judgement request   ``{question}``, ``{solution}``
==================  ======================================  ==============================

Placeholders are replaced literally (not with ``str.format``), so braces such as ``\\boxed{answer}``
need no escaping. Templates are kept short: a small model with a 1-2K context is trained on them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent
NO_CODE_DIR = BUILTIN_DIR / "no_code"  # the system messages of the evaluation modes that run no code

PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "solver_system": (),
    "solver_user": ("question",),
    "critic_system": (),
    "critic_user": ("question", "solution"),
    "revise_user": ("critique",),
    "verifier_user": ("question", "solution"),
}


class PromptError(ValueError):
    """A prompt directory or template is unusable; the message says which file and why."""


@dataclass(frozen=True)
class Prompts:
    """The six templates, plus helpers that fill them in."""

    solver_system: str
    solver_user: str
    critic_system: str
    critic_user: str
    revise_user: str
    verifier_user: str

    def solver_question(self, question: str) -> str:
        """The solver's user message for ``question``."""
        return fill(self.solver_user, question=question)

    def critic_request(self, question: str, solution: str) -> str:
        """The critic's user message for a question and the solver's solution text."""
        return fill(self.critic_user, question=question, solution=solution)

    def verifier_request(self, question: str, solution: str) -> str:
        """The critic's user message asking only for a verdict on a solution (its P(AGREE) is the score)."""
        return fill(self.verifier_user, question=question, solution=solution)

    def revise_request(self, critique: str) -> str:
        """The user message asking the solver to revise after ``critique``."""
        return fill(self.revise_user, critique=critique)


def fill(template: str, **values: str) -> str:
    """Replace each ``{name}`` in ``template`` with ``values[name]`` (literally, one pass)."""
    out, i = [], 0
    keys = {f"{{{k}}}": v for k, v in values.items()}
    while i < len(template):
        for key, value in keys.items():
            if template.startswith(key, i):
                out.append(value)
                i += len(key)
                break
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


def load_prompts(directory: str | Path | None = None) -> Prompts:
    """Load the built-in templates, overridden by any ``<name>.md`` files in ``directory``.

    Raises PromptError for a directory that does not exist, an unknown ``.md`` file in it (likely a
    typo), an unreadable or empty file, or a template missing a required placeholder.
    """
    texts = {name: _read(BUILTIN_DIR / f"{name}.md", name) for name in PLACEHOLDERS}
    if directory is not None:
        folder = Path(directory).expanduser()
        if not folder.is_dir():
            raise PromptError(f"prompt directory {folder} does not exist")
        expected = ", ".join(f"{n}.md" for n in PLACEHOLDERS)
        for path in sorted(folder.glob("*.md")):
            if path.stem not in PLACEHOLDERS:
                raise PromptError(f"{path}: unknown prompt file; expected some of: {expected}")
            texts[path.stem] = _read(path, path.stem)
    return Prompts(**{f.name: texts[f.name] for f in fields(Prompts)})


def _read(path: Path, name: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").rstrip()
    except OSError as error:
        raise PromptError(f"{path}: cannot read: {error.strerror or error}") from error
    if not text.strip():
        raise PromptError(f"{path}: empty template")
    missing = [p for p in PLACEHOLDERS[name] if f"{{{p}}}" not in text]
    if missing:
        need = ", ".join(f"{{{p}}}" for p in missing)
        raise PromptError(f"{path}: missing placeholder {need} (required in {name}.md)")
    return text


def no_code_prompts(prompts: Prompts) -> Prompts:
    """``prompts`` with the system messages in ``no_code/``, which ask for an answer in words (no code is run)."""
    return replace(prompts, solver_system=_read(NO_CODE_DIR / "solver_system.md", "solver_system"),
                   critic_system=_read(NO_CODE_DIR / "critic_system.md", "critic_system"))
