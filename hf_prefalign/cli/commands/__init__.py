"""The `hf-prefalign` subcommands, one module each: its argument dataclasses, `_arguments` (the dataclasses whose
fields are its flags) and its runner; `hf_prefalign.cli.main` dispatches to them.

`hub` holds `push` and `pull`, which share what a Trainer's output folder holds besides the model.
"""
