"""Faithfulness benchmark (see lxt_bench/faithfulness.py); same as ``lxt bench faithfulness``."""
import sys

from lxt_bench.faithfulness import main

if __name__ == "__main__":
    sys.exit(main())
