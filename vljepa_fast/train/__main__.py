"""``python -m vljepa_fast.train``: see :mod:`vljepa_fast.train.cli`."""

from vljepa_fast.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
