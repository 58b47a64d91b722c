"""Evaluation datasets: JSONL, JSON arrays and CSV files of word problems with gold answers.

Formats (chosen by the extension, or ``fmt``):

* ``.jsonl`` / ``.ndjson``: one JSON object per line (GSM8K: ``question``, ``answer`` ending in ``#### N``).
  A ``.json`` file whose first character is ``{`` is read as JSONL too.
* ``.json``: an array of objects (SVAMP: ``Body`` + ``Question``, ``Answer``, ``ID``).
* ``.csv`` / ``.tsv``: a header row, then one problem per record (MAWPS / ASDiv-A).

Fields: ``question`` / ``answer`` / ``id`` name the columns; left unset they are found per row:

* question: ``question``, ``Question``, ``problem``, ``Problem``. When the row also has ``Body`` and the
  question does not already start with it (SVAMP), the question is ``Body + " " + Question``.
* answer: ``answer``, ``Answer``, ``solution``, ``Solution``; reduced to the bare answer by
  :func:`duet.answers.gold_answer` (``#### 72`` -> ``72``; a ``\\boxed{}``; ``504.0`` -> ``504``).
* id: the row's line number (JSONL, CSV: the line its record starts on) or 1-based position (JSON array).

Masked numbers (MAWPS): when a row has a ``Numbers`` field, each ``numberK`` in the question is replaced by
the K-th value (whole values without a trailing ``.0``).

A row that cannot be used (invalid JSON, not an object, missing or empty question or answer, a mask without
a value, a duplicate id) becomes an :class:`Issue` with ``file:line`` (in a JSON array also the element's
position: ``file:line (element N)``, or ``file: element N`` when the whole array is on one line); the
caller skips it with a warning or, under ``--strict``, stops. A missing, empty or unreadable file, or one
with no usable row, raises :class:`~duet.errors.DuetError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duet.app.errors import UsageProblem
from duet.errors import DuetError

QUESTION_FIELDS = ("question", "Question", "problem", "Problem")
ANSWER_FIELDS = ("answer", "Answer", "solution", "Solution")
FORMATS = ("jsonl", "json", "csv", "tsv")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
_MASK = re.compile(r"\bnumber(\d+)\b")


class DatasetError(DuetError):
    """A data file that cannot be evaluated (missing, empty, no usable rows, malformed under --strict)."""


@dataclass(frozen=True)
class Problem:
    """One usable row: a stable ``id``, the question text, the bare gold answer, and where it came from."""

    id: str
    question: str
    gold: str
    line: int
    kind: str | None = None  # the row's ``kind`` field (e.g. a challenge split's variation): reported apart


@dataclass(frozen=True)
class Issue:
    """A row that was skipped: ``file:line: message`` (JSON arrays: with the element's 1-based position)."""

    path: str
    line: int
    message: str
    element: int | None = None  # position in a JSON array
    show_line: bool = True  # False when the whole JSON array is on one line (every element is on line 1)

    @property
    def where(self) -> str:
        """``file:line``, ``file:line (element N)`` or ``file: element N``."""
        if self.element is None:
            return f"{self.path}:{self.line}"
        if not self.show_line:
            return f"{self.path}: element {self.element}"
        return f"{self.path}:{self.line} (element {self.element})"

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Fields:
    """Field names from ``--question-field`` / ``--answer-field`` / ``--id-field`` (None: find per row)."""

    question: str | None = None
    answer: str | None = None
    id: str | None = None


@dataclass
class Dataset:
    """A loaded file: its usable problems in file order, the skipped rows, and the file's content hash."""

    path: Path
    format: str
    problems: list[Problem]
    issues: list[Issue] = field(default_factory=list)
    rows: int = 0
    sha256: str = ""


def detect_format(path: Path, text: str, fmt: str | None = None) -> str:
    """``fmt`` when given; else from the extension (a ``.json`` file that starts with ``{`` is JSONL)."""
    if fmt:
        if fmt not in FORMATS:
            raise UsageProblem(f"--format {fmt}: unknown data format; use one of: {', '.join(FORMATS)}")
        return fmt
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(
            f"{path}: cannot tell the format from the extension {path.suffix or '(none)'!r}; "
            "use .jsonl, .json or .csv, or pass --format"
        )
    if kind == "json" and text.lstrip().startswith("{"):
        return "jsonl"
    return kind


def load_dataset(path: str | Path, fields: Fields | None = None, *, fmt: str | None = None) -> Dataset:
    """Read ``path``; raises DatasetError for a missing, unreadable or empty file or one with no usable row."""
    path = Path(path)
    fields = fields or Fields()
    if fmt:
        detect_format(path, "", fmt)  # a bad --format is a usage error, before the file is read
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, not a data file") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    kind = detect_format(path, text, fmt)
    rows = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "tsv": _csv_rows}[kind](path, text, kind)
    data = Dataset(path, kind, [], sha256=hashlib.sha256(raw).hexdigest())
    one_line = kind == "json" and "\n" not in text.strip()
    seen: dict[str, str] = {}
    first_keys: list[str] | None = None

    def issue(line: int, position: int, message: str) -> Issue:
        if kind != "json":
            return Issue(str(path), line, message)
        return Issue(str(path), line, message, element=position, show_line=not one_line)

    for line, position, row in rows:
        data.rows += 1
        if isinstance(row, Issue):
            data.issues.append(issue(row.line, position, row.message))
            continue
        if first_keys is None:
            first_keys = list(row)
        try:
            problem = _problem(row, fields, line, position, kind)
        except ValueError as error:
            data.issues.append(issue(line, position, str(error)))
            continue
        if problem.id in seen:
            data.issues.append(issue(line, position, f"duplicate id {problem.id!r} (first {seen[problem.id]})"))
            continue
        seen[problem.id] = f"at element {position}" if one_line else f"on line {line}"
        data.problems.append(problem)
    if not data.rows:
        raise DatasetError(f"{path}: no rows (an empty {kind.upper()} file)")
    if not data.problems:
        hint = f"; the rows have fields: {', '.join(first_keys)}" if first_keys else ""
        first = f" (first: {data.issues[0]})" if data.issues else ""
        raise DatasetError(f"{path}: no usable rows: all {data.rows} are malformed{first}{hint}")
    return data


# ---------------------------------------------------------------------------------------------------
# Readers: yield (line, position, row dict | Issue)


def _jsonl_rows(path: Path, text: str, kind: str):
    position = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        position += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield number, position, Issue(str(path), number, f"invalid JSON: {error.msg} (column {error.colno})")
            continue
        if not isinstance(row, dict):
            yield number, position, Issue(str(path), number, f"expected a JSON object, got {_json_type(row)}")
            continue
        yield number, position, row


def _json_rows(path: Path, text: str, kind: str):
    """A JSON array, element by element, with the line each element starts on."""
    decoder = json.JSONDecoder()
    try:
        top = decoder.decode(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(top, list):
        raise DatasetError(f"{path}: expected a JSON array of objects, got {_json_type(top)}")
    i = text.index("[") + 1
    line = text.count("\n", 0, i) + 1
    for position, element in enumerate(top, 1):
        while text[i] in " \t\r\n,":
            line += text[i] == "\n"
            i += 1
        _, end = decoder.raw_decode(text, i)
        start_line = line
        line += text.count("\n", i, end)
        i = end
        if not isinstance(element, dict):
            message = f"expected a JSON object, got {_json_type(element)}"
            yield start_line, position, Issue(str(path), start_line, message)
            continue
        yield start_line, position, element


def _csv_rows(path: Path, text: str, kind: str):
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as error:
        raise DatasetError(f"{path}:1: unreadable CSV header: {error}") from None
    header = [h.strip() for h in header]
    position, start = 0, reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield start, position + 1, Issue(str(path), start, f"unreadable CSV record: {error}")
            position, start = position + 1, reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not any(v.strip() for v in values):
            continue
        position += 1
        if len(values) != len(header):
            yield line, position, Issue(str(path), line, f"{len(values)} columns, the header has {len(header)}")
            continue
        yield line, position, dict(zip(header, values, strict=True))


# ---------------------------------------------------------------------------------------------------
# Rows to problems


def _problem(row: dict[str, Any], fields: Fields, line: int, position: int, kind: str) -> Problem:
    question = _question(row, fields.question)
    answer_key = fields.answer or next((k for k in ANSWER_FIELDS if k in row), None)
    if answer_key is None or answer_key not in row:
        raise ValueError(f"no answer field {_wanted(fields.answer, ANSWER_FIELDS)}")
    gold = _gold(row[answer_key])
    if not gold:
        raise ValueError(f"empty answer in {answer_key!r}")
    if fields.id is not None:
        if fields.id not in row or _text(row[fields.id]) in (None, ""):
            raise ValueError(f"no id in field {fields.id!r}")
        ident = _text(row[fields.id]) or ""
    else:
        ident = str(position if kind == "json" else line)
    kind = row.get("kind")
    return Problem(ident.strip(), question, gold, line, kind.strip() or None if isinstance(kind, str) else None)


def _question(row: dict[str, Any], name: str | None) -> str:
    key = name or next((k for k in QUESTION_FIELDS if k in row), None)
    if key is None or key not in row:
        raise ValueError(f"no question field {_wanted(name, QUESTION_FIELDS)}")
    text = _text(row[key])
    if text is None:
        raise ValueError(f"the question field {key!r} is {_json_type(row[key])}, not text")
    text = text.strip()
    if not text:
        raise ValueError(f"empty question in {key!r}")
    body = _text(row.get("Body")) if name is None else None
    if body and body.strip() and not text.startswith(body.strip()):
        text = f"{body.strip()} {text}"
    if "Numbers" in row and _MASK.search(text):
        text = restore_masks(text, _text(row["Numbers"]) or "")
    return text


def restore_masks(text: str, numbers: str) -> str:
    """Replace ``number0``, ``number1``, ... with the space-separated ``numbers`` (``56.0`` -> ``56``)."""
    values = [plain_number(v) for v in numbers.replace(",", " ").split()]

    def value(found: re.Match[str]) -> str:
        k = int(found.group(1))
        if k >= len(values):
            raise ValueError(f"masked number{k} but Numbers has {len(values)} value(s)")
        return values[k]

    return _MASK.sub(value, text)


def plain_number(text: str) -> str:
    """``56.0`` -> ``56``; anything else unchanged."""
    text = text.strip()
    if re.fullmatch(r"[-+]?\d+\.0+", text):
        return text.split(".")[0]
    return text


def _gold(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, (int, float)):
        return plain_number(repr(value)) if isinstance(value, float) else str(value)
    if isinstance(value, list) and len(value) == 1:
        return _gold(value[0])
    text = _text(value)
    if text is None:
        return ""
    from duet.answers import gold_answer

    return plain_number(gold_answer(text))


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return plain_number(repr(value)) if isinstance(value, float) else str(value)
    return None


def _wanted(name: str | None, defaults: tuple[str, ...]) -> str:
    return repr(name) if name else "(looked for " + ", ".join(repr(k) for k in defaults) + ")"


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


# ---------------------------------------------------------------------------------------------------
# Selection


@dataclass(frozen=True)
class Shard:
    """``--shard i/n``: the i-th of n round-robin slices (1-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not found:
            raise UsageProblem(f"--shard {text!r}: expected i/n, e.g. --shard 1/4")
        index, count = int(found.group(1)), int(found.group(2))
        if count < 1 or not 1 <= index <= count:
            raise UsageProblem(f"--shard {text}: i must be between 1 and n (shards are numbered 1/{max(count, 1)}..)")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def select(
    problems: list[Problem],
    *,
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    shard: Shard | None = None,
) -> list[Problem]:
    """Shuffle (with ``seed``), keep the first ``limit``, then take shard ``i/n`` of those (round-robin).

    The shuffled order depends only on the file and the seed, so a larger ``--limit`` later extends the
    same selection, and the shards of one selection are disjoint and cover it.
    """
    chosen = list(problems)
    if shuffle:
        random.Random(seed).shuffle(chosen)
    if limit is not None:
        if limit < 0:
            raise UsageProblem(f"--limit {limit}: must be >= 0")
        chosen = chosen[:limit]
    if shard is not None:
        chosen = chosen[shard.index - 1 :: shard.count]
    return chosen
