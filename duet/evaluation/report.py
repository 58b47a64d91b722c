"""Numbers from results: per-mode summaries, comparisons between modes and runs, and their rich tables.

Per mode (``summary.json`` -> ``modes`` -> name):

==========================  =======================================================================
``n``, ``correct``          problems with a record, and how many were answered correctly
``accuracy``, ``ci95``      correct / n (errors count as wrong), Wilson 95% interval
``errors``                  records whose stop reason is backend_error, sandbox_error or error
``no_answer``               records without a prediction
``stop_reasons``            counts per stop reason
``agreed``                  dialogues where the critic agreed (None for modes without a critic)
``agreement_rate``          agreed / n
``accuracy_agreed``         {n, correct, accuracy, ci95} over the agreed records (``_not_agreed``: the rest)
``round1``                  critic modes: accuracy of the solver's first answer, and the paired difference
                            final - round 1 with its 95% interval, ``fixed`` and ``broken`` counts:
                            what the critic bought
``mean_rounds``             mean solver turns (self-consistency: per sample)
``prompt_tokens`` ...       ``completion_tokens``; ``wall_seconds`` is the union of the records' running
                            intervals, so concurrency and pauses between resumed invocations are handled
``tokens_per_second``       completion tokens / wall seconds
``problems_per_minute``     n / wall minutes; ``mean_seconds``: mean latency of one problem
==========================  =======================================================================

``duet eval report`` pairs systems by problem id, and ids are only comparable within one data file: runs
whose ``config.json`` records different data hashes (``data.sha256``) are refused, unless ``--unpaired``
asks for accuracies compared as independent samples (no flips). ``--merge`` needs runs of the
same data file (e.g. the shards of one run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from duet.agents.verifier import auroc
from duet.app.errors import UsageProblem
from duet.errors import DuetError
from duet.evaluation.modes import FAILED
from duet.evaluation.results import read_records
from duet.evaluation.stats import paired_difference, unpaired_difference, wilson


def _rate(correct: int, n: int) -> dict[str, Any]:
    ci = wilson(correct, n)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None, "ci95": list(ci) if ci else None}


def wall_seconds(records: list[dict[str, Any]]) -> float:
    """Length of the union of the records' [started, finished] intervals (sum of ``seconds`` without them)."""
    spans = sorted((r["started"], r["finished"]) for r in records
                   if isinstance(r.get("started"), (int, float)) and isinstance(r.get("finished"), (int, float)))
    if not spans:
        return float(sum(r.get("seconds") or 0.0 for r in records))
    total, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    return total + end - start


def mode_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of one mode (see the module docstring)."""
    n = len(records)
    correct = sum(1 for r in records if r.get("correct"))
    stats: dict[str, Any] = _rate(correct, n)
    stops: dict[str, int] = {}
    for r in records:
        stops[str(r.get("stop_reason"))] = stops.get(str(r.get("stop_reason")), 0) + 1
    stats["errors"] = sum(1 for r in records if r.get("stop_reason") in FAILED)
    stats["no_answer"] = sum(1 for r in records if r.get("prediction") in (None, ""))
    stats["stop_reasons"] = dict(sorted(stops.items(), key=lambda kv: -kv[1]))
    with_critic = [r for r in records if r.get("agreed") is not None]
    if with_critic:
        agreed = [r for r in with_critic if r["agreed"]]
        other = [r for r in with_critic if not r["agreed"]]
        stats["agreed"] = len(agreed)
        stats["agreement_rate"] = len(agreed) / len(with_critic)
        stats["accuracy_agreed"] = _rate(sum(1 for r in agreed if r.get("correct")), len(agreed))
        stats["accuracy_not_agreed"] = _rate(sum(1 for r in other if r.get("correct")), len(other))
    else:
        stats["agreed"] = stats["agreement_rate"] = stats["accuracy_agreed"] = stats["accuracy_not_agreed"] = None
    first = [r for r in records if "first_correct" in r]
    if first:
        diff = paired_difference([bool(r["first_correct"]) for r in first], [bool(r.get("correct")) for r in first])
        stats["round1"] = {**_rate(sum(1 for r in first if r["first_correct"]), len(first)),
                           "difference": diff.to_dict() if diff else None}
    else:
        stats["round1"] = None
    scored = [r for r in records if isinstance(r.get("first_score"), (int, float)) and "first_correct" in r]
    stats["verifier_auroc"] = (auroc([r["first_score"] for r in scored], [bool(r["first_correct"]) for r in scored])
                               if scored else None)
    verifying = [r for r in records if "pass_at_k" in r]
    if verifying:  # verifier@k: the parts of what a verifier can buy
        stats["verifier"] = {name: _rate(sum(1 for r in verifying if r.get(key)), len(verifying))
                             for name, key in (("greedy", "first_correct"), ("majority", "majority_correct"),
                                               ("weighted", "correct"), ("pass_at_k", "pass_at_k"))}
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("kind"):
            kinds.setdefault(str(r["kind"]), []).append(r)
    stats["kinds"] = {k: _rate(sum(1 for r in rs if r.get("correct")), len(rs)) for k, rs in sorted(kinds.items())}
    rounds = [r.get("rounds") for r in records if isinstance(r.get("rounds"), (int, float))]
    stats["mean_rounds"] = sum(rounds) / len(rounds) if rounds else None
    tokens = [r.get("tokens") or {} for r in records]
    stats["prompt_tokens"] = sum(int(t.get("prompt", 0) or 0) for t in tokens)
    stats["completion_tokens"] = sum(int(t.get("completion", 0) or 0) for t in tokens)
    wall = wall_seconds(records)
    stats["wall_seconds"] = round(wall, 3)
    stats["mean_seconds"] = sum(r.get("seconds") or 0.0 for r in records) / n if n else None
    stats["tokens_per_second"] = stats["completion_tokens"] / wall if wall > 0 else None
    stats["problems_per_minute"] = n / wall * 60 if wall > 0 else None
    return stats


def group_by_mode(records: list[dict[str, Any]], order: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Records per mode: modes of ``order`` first, then others in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {m: [] for m in order or []}
    for r in records:
        groups.setdefault(r["mode"], []).append(r)
    return {m: rs for m, rs in groups.items() if rs}


def compare(a: list[dict[str, Any]], b: list[dict[str, Any]], *, paired: bool = True) -> dict[str, Any]:
    """B vs A: paired by id when they share problems (else unpaired), with the problems that flipped.

    ``paired=False`` (different data files, whose ids name different problems): unpaired, no flips."""
    by_id_a = {r["id"]: r for r in a}
    common = [r for r in b if r["id"] in by_id_a] if paired else []
    flips: list[dict[str, Any]] = []
    kinds: dict[str, Any] = {}
    if common:
        outcome_a = [bool(by_id_a[r["id"]].get("correct")) for r in common]
        outcome_b = [bool(r.get("correct")) for r in common]
        diff = paired_difference(outcome_a, outcome_b)
        for kind in sorted({str(r["kind"]) for r in common if r.get("kind")}):
            pairs = [(x, y) for r, x, y in zip(common, outcome_a, outcome_b, strict=True) if r.get("kind") == kind]
            kind_diff = paired_difference([x for x, _ in pairs], [y for _, y in pairs])
            kinds[kind] = kind_diff.to_dict() if kind_diff else None
        for r, x, y in zip(common, outcome_a, outcome_b, strict=True):
            if x != y:
                flips.append({"id": r["id"], "change": "fixed" if y else "broken", "question": r.get("question"),
                              "gold": r.get("gold"), "a": by_id_a[r["id"]].get("prediction"),
                              "b": r.get("prediction")})
    else:
        diff = unpaired_difference(sum(1 for r in a if r.get("correct")), len(a),
                                   sum(1 for r in b if r.get("correct")), len(b))
    return {"difference": diff.to_dict() if diff else None, "flips": flips, "kinds": kinds}


def summarize(records: list[dict[str, Any]], *, run_dir: Path | None = None, config: dict[str, Any] | None = None,
              mode_order: list[str] | None = None) -> dict[str, Any]:
    """``summary.json``: per-mode numbers, and each mode against the first (paired by id)."""
    groups = group_by_mode(records, mode_order)
    names = list(groups)
    comparisons = []
    for name in names[1:]:
        result = compare(groups[names[0]], groups[name])
        comparisons.append({"a": names[0], "b": name, "difference": result["difference"],
                            "kinds": result["kinds"], "flipped": [f["id"] for f in result["flips"]]})
    return {
        "run": str(run_dir) if run_dir else None,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": (config or {}).get("data"),  # path, sha256, format, rows, usable, malformed (skipped), fields
        "selection": (config or {}).get("selection"),
        "models": {k: (v or {}).get("spec") for k, v in ((config or {}).get("model") or {}).items()},
        "records": len(records),
        "modes": {name: mode_stats(rs) for name, rs in groups.items()},
        "comparisons": comparisons,
    }


# ---------------------------------------------------------------------------------------------------
# Formatting


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def ci_text(ci: list[float] | tuple[float, float] | None) -> str:
    return "" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def signed(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _acc_cell(rate: dict[str, Any] | None) -> str:
    if not rate or not rate["n"]:
        return "-"
    return f"{pct(rate['accuracy'])} (n={rate['n']})"


def summary_table(modes: dict[str, dict[str, Any]], title: str = "duet eval") -> Any:
    """The rich table: one row per mode (or per run/mode in a report)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name, justify in [("mode", "left"), ("n", "right"), ("accuracy", "right"), ("95% CI", "right"),
                          ("agree", "right"), ("acc | agree", "right"), ("acc | disagree", "right"),
                          ("rounds", "right"), ("tok/s", "right"), ("prob/min", "right"), ("errors", "right")]:
        table.add_column(name, justify=justify, no_wrap=name != "mode")
    for name, s in modes.items():
        table.add_row(name, str(s["n"]), pct(s["accuracy"]), ci_text(s["ci95"]), pct(s["agreement_rate"]),
                      _acc_cell(s["accuracy_agreed"]), _acc_cell(s["accuracy_not_agreed"]),
                      _num(s["mean_rounds"], "{:.2f}"), _num(s["tokens_per_second"]),
                      _num(s["problems_per_minute"]), str(s["errors"]))
    return table


def kinds_table(modes: dict[str, dict[str, Any]]) -> Any | None:
    """Accuracy per kind of problem (the data's ``kind`` field), one column per mode."""
    from rich.table import Table

    kinds = sorted({k for s in modes.values() for k in (s.get("kinds") or {})})
    if not kinds:
        return None
    table = Table(title="Accuracy per kind", title_justify="left")
    table.add_column("kind")
    for name in modes:
        table.add_column(name, justify="right")
    for kind in kinds:
        cells = []
        for s in modes.values():
            rate = (s.get("kinds") or {}).get(kind)
            cells.append(f"{pct(rate['accuracy'])} {ci_text(rate['ci95'])} (n={rate['n']})" if rate else "-")
        table.add_row(kind, *cells)
    return table


def verifier_table(modes: dict[str, dict[str, Any]]) -> Any | None:
    """What a verifier can buy: its AUROC on the solver's first answers; for verifier@k the accuracy of greedy,
    the plain majority and the weighted vote, and pass@k (some sample right: the ceiling)."""
    from rich.table import Table

    rows = [(name, s) for name, s in modes.items() if s.get("verifier_auroc") is not None or s.get("verifier")]
    if not rows:
        return None
    table = Table(title="The verifier", title_justify="left")
    for name in ("mode", "AUROC (first answers)", "greedy", "majority", "weighted vote", "pass@k"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    for name, s in rows:
        v = s.get("verifier") or {}
        table.add_row(name, _num(s.get("verifier_auroc"), "{:.3f}"),
                      *(f"{pct(v[k]['accuracy'])} {ci_text(v[k]['ci95'])}" if k in v else "-"
                        for k in ("greedy", "majority", "weighted", "pass_at_k")))
    return table


def critic_table(modes: dict[str, dict[str, Any]]) -> Any | None:
    """What the critic bought: the solver's first answer vs the final one, paired per problem."""
    from rich.table import Table

    rows = [(name, s) for name, s in modes.items() if s.get("round1") and s["round1"].get("difference")]
    if not rows:
        return None
    table = Table(title="What the critic bought (final answer vs the solver's first)", title_justify="left")
    for name in ("mode", "round-1 acc", "final acc", "difference", "95% CI", "fixed", "broken", "p"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    for name, s in rows:
        d = s["round1"]["difference"]
        table.add_row(name, pct(s["round1"]["accuracy"]), pct(s["accuracy"]), signed(d["difference"]),
                      _ci_pts(d), str(d["fixed"]), str(d["broken"]), _num(d["p_value"], "{:.3f}"))
    return table


def _ci_pts(d: dict[str, Any]) -> str:
    return f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def differences_table(comparisons: list[dict[str, Any]], title: str = "Differences (B - A)") -> Any | None:
    from rich.table import Table

    rows = [c for c in comparisons if c.get("difference")]
    if not rows:
        return None
    table = Table(title=title, title_justify="left")
    for name in ("A", "B", "n", "acc A", "acc B", "B - A", "95% CI", "fixed", "broken", "p", "paired"):
        table.add_column(name, justify="left" if name in ("A", "B") else "right")
    for c in rows:
        for label, d in [("", c["difference"]), *((f" ({k})", v) for k, v in (c.get("kinds") or {}).items() if v)]:
            paired = d["paired"]
            table.add_row(c["a"] + label, c["b"] + label, str(d["n"]), pct(d["accuracy_a"]), pct(d["accuracy_b"]),
                          signed(d["difference"]), _ci_pts(d), str(d["fixed"]) if paired else "-",
                          str(d["broken"]) if paired else "-", _num(d["p_value"], "{:.3f}") if paired else "-",
                          "yes" if paired else "no")
    return table


def flips_table(a: str, b: str, flips: list[dict[str, Any]], limit: int) -> Any | None:
    from rich.table import Table

    if not flips or limit <= 0:
        return None
    more = f" (showing {limit} of {len(flips)})" if len(flips) > limit else ""
    table = Table(title=f"Flipped: {a} -> {b}{more}", title_justify="left")
    for name in ("id", "change", "gold", a, b, "question"):
        table.add_column(name, overflow="fold" if name == "question" else "ellipsis",
                         max_width=60 if name == "question" else 24)
    for f in flips[:limit]:
        question = " ".join(str(f.get("question") or "").split())
        table.add_row(str(f["id"]), f["change"], _shown(f.get("gold")), _shown(f.get("a")), _shown(f.get("b")),
                      question[:120] + ("…" if len(question) > 120 else ""))
    return table


def _shown(value: Any) -> str:
    """A prediction or gold answer in a table: ``—`` when there is none."""
    return "—" if value is None or value == "" else str(value)


def print_summary(summary: dict[str, Any], console: Any) -> None:
    """The tables printed at the end of ``duet eval``."""
    console.print(summary_table(summary["modes"], title=f"duet eval: {summary.get('run')}"))
    for table in (kinds_table(summary["modes"]), verifier_table(summary["modes"]), critic_table(summary["modes"]),
                  differences_table(summary["comparisons"])):
        if table is not None:
            console.print(table)
    for role, c in (summary.get("prefix_cache") or {}).items():
        console.print(f"prefix cache ({role}): {pct(c['hit_rate'])} of {c['prompt_tokens']:,} prompt tokens "
                      f"reused ({c['hits']}/{c['requests']} requests hit), {c['held_bytes'] / 2**20:.1f} MiB held, "
                      f"{c['evicted_blocks']} blocks evicted")


# ---------------------------------------------------------------------------------------------------
# duet eval report


@dataclass
class Run:
    """A run directory as read by the report."""

    path: Path
    label: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise DuetError(f"{path}: no such run directory")
    results = path / "results.jsonl"
    if not results.exists():
        raise DuetError(f"{path}: not a duet eval run (no results.jsonl)")
    loaded = read_records(results)
    notes = []
    if loaded.torn_bytes:
        notes.append(f"{results}: a torn last line was ignored (the run was interrupted or is still going)")
    if loaded.bad_lines:
        notes.append(f"{results}: ignored invalid line(s) {', '.join(map(str, loaded.bad_lines[:5]))}")
    if loaded.duplicates:
        notes.append(f"{results}: {loaded.duplicates} repeated record(s) ignored")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        config = {}
    return Run(path, path.name or str(path), config, loaded.records, notes)


def data_sha256(run: Run) -> str | None:
    """The hash of the data file the run was made on (None: config.json does not say)."""
    sha = (run.config.get("data") or {}).get("sha256")
    return sha if isinstance(sha, str) and sha else None


def _data_name(run: Run) -> str:
    path = (run.config.get("data") or {}).get("path")
    sha = data_sha256(run) or "?"
    return f"{Path(path).name if path else 'data'} sha256 {sha[:12]}"


def build_report(paths: list[str | Path], *, merge: bool = False, baseline: str | None = None,
                 unpaired: bool = False) -> dict[str, Any]:
    """Systems (run x mode) side by side, each against the baseline (the first unless named).

    Systems from runs on different data files (their config.json's ``data.sha256`` differ) are not paired
    by id: a UsageProblem unless ``unpaired``, which compares every pair's accuracies as independent samples
    (no flips).
    """
    runs = [load_run(p) for p in paths]
    notes = [n for r in runs for n in r.notes]
    labels = [r.label for r in runs]
    for i, run in enumerate(runs):  # make labels unique
        if labels.count(run.label) > 1:
            run.label = f"{run.label}#{i + 1}"
    hashes = {data_sha256(r) for r in runs} - {None}
    if len(runs) > 1 and len(hashes) > 1 and merge:
        listed = "; ".join(f"{r.label}: {_data_name(r)}" for r in runs)
        raise UsageProblem(f"--merge: the runs were made on different data files ({listed}); merge only runs of "
                           "one data file, e.g. the shards of one run")
    unhashed = [r.label for r in runs if data_sha256(r) is None]
    if len(runs) > 1 and unhashed:
        notes.append(f"{', '.join(unhashed)}: config.json records no data hash; problems are paired by id "
                     "assuming the runs used the same data file")
    systems: dict[str, list[dict[str, Any]]] = {}
    origin: dict[str, Run] = {}
    if merge:
        seen: set[tuple[str, str]] = set()
        merged = []
        for run in runs:
            for r in run.records:
                if (r["id"], r["mode"]) in seen:
                    notes.append(f"{run.path}: ({r['id']}, {r['mode']}) is in an earlier run too; the first is kept")
                    continue
                seen.add((r["id"], r["mode"]))
                merged.append(r)
        order = [m for run in runs for m in run.config.get("modes", [])]
        systems = dict(group_by_mode(merged, list(dict.fromkeys(order))))
    else:
        for run in runs:
            for mode, records in group_by_mode(run.records, run.config.get("modes")).items():
                name = mode if len(runs) == 1 else f"{run.label}/{mode}"
                systems[name] = records
                origin[name] = run
    if not systems:
        raise DuetError("no records in " + ", ".join(str(p) for p in paths))
    names = list(systems)
    base = baseline or names[0]
    if base not in systems:
        raise DuetError(f"--baseline {base!r} is not one of: {', '.join(names)}")
    comparisons = []
    for name in names:
        if name == base:
            continue
        run_a, run_b = origin.get(base), origin.get(name)
        same_data = True
        if run_a is not None and run_b is not None and run_a is not run_b:
            sha_a, sha_b = data_sha256(run_a), data_sha256(run_b)
            same_data = sha_a is None or sha_b is None or sha_a == sha_b
        if not same_data:
            assert run_a is not None and run_b is not None
            if not unpaired:
                raise UsageProblem(
                    f"{run_a.label} and {run_b.label} were run on different data files ({_data_name(run_a)}; "
                    f"{_data_name(run_b)}), so their problem ids cannot be paired; pass --unpaired to compare "
                    "their accuracies only"
                )
            notes.append(f"{base} and {name}: different data files, compared unpaired (accuracies only, no flips)")
        result = compare(systems[base], systems[name], paired=same_data and not unpaired)
        comparisons.append({"a": base, "b": name, "same_data": same_data, **result})
    return {"runs": [str(r.path) for r in runs], "baseline": base, "notes": list(dict.fromkeys(notes)),
            "data": {r.label: {"path": (r.config.get("data") or {}).get("path"), "sha256": data_sha256(r)}
                     for r in runs},
            "systems": {name: mode_stats(rs) for name, rs in systems.items()}, "comparisons": comparisons}


def system_records(paths: list[str | Path], *, merge: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The records of each system (run x mode) as the report names them (for --plot)."""
    runs = [load_run(p) for p in paths]
    if merge:
        merged: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            for mode, records in group_by_mode(run.records, run.config.get("modes")).items():
                merged.setdefault(mode, []).extend(records)
        return merged
    return {(mode if len(runs) == 1 else f"{run.path.name}/{mode}"): records
            for run in runs for mode, records in group_by_mode(run.records, run.config.get("modes")).items()}


def print_report(report: dict[str, Any], console: Any, *, flips: int = 20) -> None:
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    console.print(summary_table(report["systems"], title="duet eval report"))
    for table in (kinds_table(report["systems"]), verifier_table(report["systems"]), critic_table(report["systems"])):
        if table is not None:
            console.print(table)
    diffs = differences_table(report["comparisons"], title=f"Differences against {report['baseline']} (B - A)")
    if diffs is not None:
        console.print(diffs)
    for c in report["comparisons"]:
        table = flips_table(c["a"], c["b"], c["flips"], flips)
        if table is not None:
            console.print(table)
        elif c.get("difference") and c["difference"]["paired"] and flips > 0:
            console.print(f"No problem flipped between {c['a']} and {c['b']}.")
