"""Thin Typer command modules: parse options, load the config, call the core, print with rich.

Heavy modules (torch, the model, the data pipeline) are imported inside the command functions so that
`evo2 -h` answers at once.
"""
