"""The ``dmde`` command line: :mod:`dmde.cli.main` and one module per sub-command."""
