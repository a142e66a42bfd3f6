"""``python -m dmde``: the same as the ``dmde`` console script (also what torchrun launches)."""
from dmde.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
