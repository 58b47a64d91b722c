r"""The real problems and their files: MAWPS + ASDiv-A, GSM8K and the model's own attempts, split into train and dev.

- MAWPS + ASDiv-A (`shared/data/mawps_asdiv_a/train.csv`): masked templates whose numbers are
  resampled for endless fresh variants, the prefix equation turned into Python;
- GSM8K (`shared/data/gsm8k/train.jsonl`): the calculator annotations `<<48/2=24>>` turned into
  Python lines whose later steps refer to earlier results by name;
- on-policy attempts (`duet train --onpolicy FILE`, built by `python -m duet.train.onpolicy build`): the
  model's own solver turns on training problems.

A fixed dev split of the real problems (by source row) is never trained on.
"""

from __future__ import annotations

import csv
import json
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from duet.errors import DuetError
from duet.train.solutions import NUMBER_LITERAL, Cell, Problem, clean_result, is_number, pretty_number, wrong_variants
from duet.train.story import Story, infix, masks_used, number_text, tidy
from duet.train.variations import fresh_numbers

DEV_FRACTION = 0.1  # of each real source, held out by row
MAWPS_COLUMNS = ("Question", "Numbers", "Equation", "Answer")


class DataError(DuetError, ValueError):
    """A training data file cannot be read: the message names the file (and line) and what is wrong."""


# ----------------------------------------------------------------------------- on-policy attempts


@dataclass
class Attempt:
    """A training problem (with its reference cells) and the solver turn the model wrote for it."""

    problem: Problem
    solution: str  # the solver turn's text, exactly as the dialogue saw it
    answer: str | None  # the model's boxed answer
    correct: bool


def load_attempts(path: Path) -> list[Attempt]:
    """Attempts written by `python -m duet.train.onpolicy build` (one JSON object per line)."""
    attempts = []
    for number, line in _lines(path):
        try:
            r = json.loads(line)
            cells: list[Cell] = [(step, code) for step, code in r["cells"]]
            problem = Problem(r["question"], cells, "onpolicy", r["id"])
            attempts.append(Attempt(problem, r["solution"], r["answer"], bool(r["correct"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}:{number}: not an on-policy attempt ({e}); rebuild it with "
                            "`python -m duet.train.onpolicy build`") from None
    if not attempts:
        raise DataError(f"{path} holds no attempts; build it with `python -m duet.train.onpolicy build`")
    return attempts


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


# ----------------------------------------------------------------------------- MAWPS + ASDiv-A

@dataclass
class MawpsRow:
    index: int
    question: str  # with number0.. masks
    numbers: list[float]
    equation: list[str]
    answer: float

    def story(self) -> Story:
        return Story(tidy(self.question), tuple(self.numbers), tuple(self.equation), f"mawps-{self.index}")


def load_mawps(path: Path) -> list[MawpsRow]:
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in MAWPS_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: its header ({', '.join(reader.fieldnames or [])}) lacks the column(s) "
                                f"{', '.join(missing)}; expected {', '.join(MAWPS_COLUMNS)}")
            for i, r in enumerate(reader):
                try:
                    rows.append(MawpsRow(i, r["Question"], [float(x) for x in r["Numbers"].split()],
                                         r["Equation"].split(), float(r["Answer"])))
                except (AttributeError, KeyError, TypeError, ValueError):  # a short row holds None
                    continue
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a UTF-8 CSV file ({e})") from None
    if not rows:
        raise DataError(f"{path}: no usable rows")
    return rows


def load_gsm8k(path: Path) -> list[dict]:
    """The GSM8K rows ({"question", "answer", ...}) of a JSONL file, or a `FILE:LINE: ...` error."""
    rows = []
    for number, line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not JSON ({e})") from None
        if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                and isinstance(row.get("answer"), str)):
            raise DataError(f"{path}:{number}: expected an object with text fields question and answer")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def mawps_problem(row: MawpsRow, rng: random.Random | None) -> Problem | None:
    """The row with its numbers (fresh ones when rng is given) and a solution; None if it does not work out.

    Without rng the row keeps its numbers and must reproduce the dataset's answer (its gold)."""
    story = row.story()
    if rng is not None:
        story = fresh_numbers(story, rng)
        if story is None:
            return None
    problem = story_problem(story, rng or random.Random(row.index))
    if problem is None:
        return None
    if rng is None:
        if abs(float(problem.gold or "nan") - row.answer) > 1e-6 * max(1, abs(row.answer)):
            return None
        problem.gold = number_text(row.answer)  # the dataset's answer, as the dataset writes it
    else:
        problem.gold = None
    return problem


_STEP_WORDS = {"+": "Add the amounts.", "-": "Subtract to find the difference.",
               "*": "Multiply to find the total.", "/": "Divide to find the amount for each."}


def story_problem(story: Story, rng: random.Random, source: str = "mawps") -> Problem | None:
    """A story solved in one code cell, ``answer = <the equation with its numbers>``, with wrong solutions
    for the critic (another operation, swapped operands, a number the answer does not need)."""
    values = {f"number{i}": number_text(v) for i, v in enumerate(story.numbers)}
    try:
        expression = infix(story.equation, values, minimal=False)
    except (ValueError, IndexError, KeyError):
        return None
    top = story.equation[0]
    step = _STEP_WORDS[top] if len(story.equation) == 3 and top in _STEP_WORDS else "Combine the numbers step by step."
    cells = [(step, f"answer = {expression}\nprint(answer)")]
    answer = clean_result(cells)
    if answer is None:
        return None
    used = masks_used(story.equation)
    spare = [v for k, v in values.items() if k not in used]
    wrong = wrong_variants(cells, list(values.values()), spare, rng)
    return Problem(story.question(), cells, source, story.source or source, wrong, gold=answer)


# ----------------------------------------------------------------------------- GSM8K

_ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def gsm8k_problem(index: int, question: str, answer: str) -> Problem | None:
    """GSM8K's calculator steps as Python lines; earlier results are referred to by name."""
    gold = answer.split("####")[-1].strip().replace(",", "")
    results: dict[str, str] = {}
    lines = []
    names = iter("abcdefghjkmnpqrstuvwxyz")
    for expr, result in _ANNOTATION.findall(answer):
        expr = expr.replace("x", "*").replace("^", "**").replace(",", "").strip()
        if not re.fullmatch(r"[\d.+\-*/() %]+", expr) or "%" in expr:
            return None
        # numbers that are earlier results (and not in the question) become the earlier variable
        def swap(m: re.Match) -> str:
            text = m.group(0)
            if text in results and not re.search(rf"(?<![\d.]){re.escape(text)}(?![\d.])", question):
                return results[text]
            return text

        expr = NUMBER_LITERAL.sub(swap, expr)
        try:
            name = next(names)
        except StopIteration:
            return None
        lines.append(f"{name} = {expr}")
        results[pretty_number(result.strip())] = name
    if not lines:
        return None
    last = lines[-1].split(" = ")[0]
    cells = [("Compute each quantity in turn.", "\n".join(lines) + f"\nanswer = {last}\nprint(answer)")]
    got = clean_result(cells)
    if got is None or not is_number(gold) or abs(float(got) - float(gold)) > 1e-6:
        return None
    numbers = NUMBER_LITERAL.findall(question.replace(",", ""))
    wrong = wrong_variants([(cells[0][0], lines[-1])], numbers, numbers, random.Random(index))
    wrong = [[(cells[0][0], "\n".join(lines[:-1] + [w[-1][1]]) + f"\nanswer = {last}\nprint(answer)")]
             for w in wrong]
    return Problem(question, cells, "gsm8k", f"gsm8k-{index}", wrong, gold=gold)


# ----------------------------------------------------------------------------- splits


def normalised(text: str) -> str:
    """A problem's text with its numbers, case, punctuation and spacing taken out (to find the same story)."""
    text = re.sub(r"number\d+|\d[\d,.]*", " N ", text.lower())
    return " ".join(re.findall(r"[a-z]+|N", text))


def is_dev(source: str, index: int) -> bool:
    """The fixed dev split: about DEV_FRACTION of each real source's rows, chosen by a hash of the row."""
    return zlib.crc32(f"{source}:{index}".encode()) % 1000 < DEV_FRACTION * 1000


@dataclass
class Sources:
    """The real problems, split into train and dev."""

    mawps_train: list[MawpsRow]
    gsm8k_train: list[Problem]
    mawps_dev: list[MawpsRow]
    gsm8k_dev: list[dict]
    attempts: list[Attempt] = field(default_factory=list)  # the model's own solutions (`--onpolicy`)
    # dev rows whose story a non-dev row also tells (other numbers): not held out from a model trained on
    # every non-dev row, as the embedded model's first phases were; write_dev marks them
    told_in_training: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, data_dir: Path, attempts: Path | None = None) -> Sources:
        mawps = load_mawps(data_dir / "mawps_asdiv_a" / "train.csv")
        gsm_rows = load_gsm8k(data_dir / "gsm8k" / "train.jsonl")
        # A training row whose text (numbers aside) is a dev row's would leak the dev split: MAWPS holds
        # the same story under several rows, so a split by row alone is not enough.
        dev_texts = {normalised(r.question) for r in mawps if is_dev("mawps", r.index)}
        dev_texts |= {normalised(row["question"]) for i, row in enumerate(gsm_rows) if is_dev("gsm8k", i)}
        gsm_train = []
        for i, row in enumerate(gsm_rows):
            if not is_dev("gsm8k", i) and normalised(row["question"]) not in dev_texts:
                problem = gsm8k_problem(i, row["question"], row["answer"])
                if problem:
                    gsm_train.append(problem)
        return cls(
            mawps_train=[r for r in mawps if not is_dev("mawps", r.index) and normalised(r.question) not in dev_texts],
            gsm8k_train=gsm_train,
            mawps_dev=[r for r in mawps if is_dev("mawps", r.index)],
            gsm8k_dev=[{"id": f"gsm8k-{i}", **row} for i, row in enumerate(gsm_rows) if is_dev("gsm8k", i)],
            attempts=[a for a in (load_attempts(attempts) if attempts else [])
                      if normalised(a.problem.question) not in dev_texts],
            told_in_training={normalised(r.question) for r in mawps if not is_dev("mawps", r.index)},
        )

    def write_dev(self, out_dir: Path) -> dict[str, Path]:
        """Dev files in `duet eval` formats: MAWPS rows with their original numbers, and GSM8K rows. A MAWPS
        row's ``kind`` says whether a training row tells the same story (``story_in_training``) or not
        (``held_out``), so `duet eval` reports the two apart."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"mawps": out_dir / "mawps_asdiv_a_dev.jsonl", "gsm8k": out_dir / "gsm8k_dev.jsonl"}
        with open(paths["mawps"], "w") as f:
            for row in self.mawps_dev:
                p = mawps_problem(row, None)
                if p:
                    kind = "story_in_training" if normalised(row.question) in self.told_in_training else "held_out"
                    f.write(json.dumps({"id": p.id, "kind": kind, "question": p.question,
                                        "answer": f"#### {p.gold}"}) + "\n")
        with open(paths["gsm8k"], "w") as f:
            for row in self.gsm8k_dev:
                f.write(json.dumps(row) + "\n")
        return paths
