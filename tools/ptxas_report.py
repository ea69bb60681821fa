"""Registers, spills and shared memory of every CUDA kernel, from the
`ptxas -v` lines of a build log (`make ptxas`). Prints a Markdown table and
exits non-zero when a kernel spills.

    python tools/ptxas_report.py build/ptxas/build.log
"""

import re
import subprocess
import sys


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return list(names)


def parse(log: str):
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                       "spill_loads": 0, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill_stores"], current["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return rows


def main() -> int:
    rows = parse(open(sys.argv[1]).read())
    if not rows:
        print("no ptxas -v output found (was the build made with -Xptxas=-v and CUDA on?)", file=sys.stderr)
        return 1
    names = demangle([r["kernel"] for r in rows])
    print("| kernel | arch | registers | spill stores | spill loads | static smem |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r, name in zip(rows, names):
        short = name.replace("(anonymous namespace)::", "").replace("memboost::", "")
        short = re.sub(r"\(.*", "", short)  # the parameter list
        print(f"| {short[:90]} | {r['arch']} | {r['registers']} | {r['spill_stores']} | {r['spill_loads']} | "
              f"{r['smem']} |")
    spills = [n for r, n in zip(rows, names) if r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} kernel builds, {len(spills)} with spills")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
