"""hw's command-line interface (Typer). Thin: parsing and printing; the work is in pycore."""
