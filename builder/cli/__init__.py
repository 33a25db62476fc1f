"""The `builder` command: the only place errors become exit codes."""
