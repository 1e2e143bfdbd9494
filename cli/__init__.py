"""The `hetero` command line (typer + rich); it only consumes what hetero/ produces."""
