"""First-token sink benchmark (see lxt_bench/sink.py); same as ``lxt bench sink``."""
import sys

from lxt_bench.sink import main

if __name__ == "__main__":
    sys.exit(main())
