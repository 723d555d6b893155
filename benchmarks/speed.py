"""Cost benchmark (see lxt_bench/speed.py); same as ``lxt bench speed``."""
import sys

from lxt_bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
