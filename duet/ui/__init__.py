"""The `duet` command's user-facing parts: rendering, the REPL, views of the log, the clipboard.

Every module here imports only the standard library and rich at module level (the model runtime is
imported when a local backend is built), so the commands that do not need a model start quickly.
"""
