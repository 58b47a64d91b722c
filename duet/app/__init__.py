"""What the commands share below the UI: settings, building backends from them, the log store, usage errors.

`duet.ui` (rendering and the REPL), `duet.evaluation` and `duet.bench` build on this package; it never
imports from them. Module level imports only the standard library (the model runtime is imported when a
local backend is built), so commands that do not need a model start quickly.
"""
