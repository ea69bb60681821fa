"""memboost against bitsandbytes and HQQ on SmolLM2-135M, two Debian texts:
the same as `memboost compare` (the logic and its notes: memboost/compare.py).

    python benchmarks/bench_compare.py [--quick] [--json benchmarks/results/compare_cpu.json]
                                       [--plot benchmarks/results/compare_cpu.png]
"""

import sys

from memboost.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
