"""Where the samples of a py-spy profile went: functions by their own
samples and by the samples of everything they called.

``python -m bench.ab --profile DIR`` writes py-spy's raw format, one line
per distinct stack (frames from the thread down, ``;`` between them) and
its sample count last.  This reads one or more such files and prints the
functions with the largest share, the way ``perf report`` does for native
code, so that two profiles can be compared by eye:

    python -m bench.stacks DIR/1-1.txt --top 25
    python -m bench.stacks DIR/*.txt --match sqlite_queue   # only these frames

A frame is ``function (file:line)``; the line is dropped so that one
function counts once, wherever in it the sample fell.  A function that
appears twice in one stack (recursion) counts once for that stack.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
FRAME_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """``send (postwarden/smtp/session.py:120)`` -> ``send (postwarden/smtp/session.py)``."""
    return FRAME_LINE.sub(")", frame.strip())


def read(paths: list[Path]) -> tuple[Counter[str], Counter[str], int]:
    """Own and inclusive samples per function, and the samples in all."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for path in paths:
        for text in path.read_text(errors="replace").splitlines():
            m = LINE.match(text)
            if m is None:
                continue
            count = int(m["count"])
            frames = [frame_name(f) for f in m["stack"].split(";") if f]
            if not frames:
                continue
            total += count
            own[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
    return own, inclusive, total


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="py-spy raw output (--format raw)")
    ap.add_argument("--top", type=int, default=30, help="functions shown in each table")
    ap.add_argument("--match", default="", help="only functions whose name contains this")
    args = ap.parse_args()
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        print(f"bench.stacks: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    own, inclusive, total = read(args.files)
    if total == 0:
        print("bench.stacks: no samples in these files", file=sys.stderr)
        return 1
    print(f"{total:,} samples")
    for title, counts in (("own samples", own), ("with what it calls", inclusive)):
        print(f"\n{title}:")
        shown = [(n, c) for n, c in counts.most_common() if args.match in n][:args.top]
        for name, count in shown:
            print(f"  {100 * count / total:6.2f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
