"""Subcommands of the ``cryoal`` CLI, one module each (``add_arguments`` + ``main``)."""
