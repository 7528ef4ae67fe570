"""``python -m vljepa_fast.eval --help``."""

from vljepa_fast.eval.cli import main

if __name__ == "__main__":
    main()
