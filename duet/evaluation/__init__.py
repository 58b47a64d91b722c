"""Scripted batch evaluation: ``duet eval`` runs the dialogue over a dataset and reports the numbers.

Modules (none imports torch at module level):

* :mod:`~duet.evaluation.datasets`: JSONL / JSON / CSV loaders, malformed-row reports, selection.
* :mod:`~duet.evaluation.modes`: the ablation modes and how one problem is run in each.
* :mod:`~duet.evaluation.results`: the crash-safe ``results.jsonl`` (append + fsync, torn-line repair).
* :mod:`~duet.evaluation.run_types`: the run's options (``EvalOptions``), what it decided, what it did.
* :mod:`~duet.evaluation.backend_options`: ``-O KEY=VALUE`` parsing and checking, building the backends.
* :mod:`~duet.evaluation.provenance`: model and checkpoint hashes, the fingerprint, git and versions.
* :mod:`~duet.evaluation.runner`: run directories, resume, one invocation from start to summary.
* :mod:`~duet.evaluation.runlock`, :mod:`~duet.evaluation.progress`, :mod:`~duet.evaluation.pool`: the run's
  lock file, its progress bar, and the thread pool of concurrent dialogues.
* :mod:`~duet.evaluation.stats`: Wilson intervals, paired and unpaired differences, McNemar.
* :mod:`~duet.evaluation.report`: per-mode summaries, rich tables, ``duet eval report``.
* :mod:`~duet.evaluation.cli`: the typer app ``eval_app`` mounted as ``duet eval``.
"""
