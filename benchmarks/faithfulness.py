"""Faithfulness benchmark (see lxt/bench/faithfulness.py); same as ``lxt bench faithfulness``."""
import sys

from lxt.bench.faithfulness import main

if __name__ == "__main__":
    sys.exit(main())
