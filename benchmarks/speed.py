"""Cost benchmark (see lxt/bench/speed.py); same as ``lxt bench speed``."""
import sys

from lxt.bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
