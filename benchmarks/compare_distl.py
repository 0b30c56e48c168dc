"""Agreement with the real DISTL: our analysis of the shared frames against its recorded output.

    python benchmarks/compare_distl.py [--refs DIR] [--frames DIR] [--sets default,res4.9_bins] [--diff]

For each frame and parameter set it compares every summary field with DISTL's (``summary.jsonl``) within the
tolerances of the core issue, and the whole text body with ``<frame>.<set>.txt``; it prints, per field, how
many frame/set pairs agree, and how many bodies are byte-identical.  Compressed frames are decompressed into
a temporary folder first, because the reference was made from the decompressed files.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from peer import SHARED, plain_frames
from spotfinder_core import analyse, parse_words
from spotfinder_core.report import format_body

SETS = {"default": [], "res4.9_bins": ["distl.res.outer=4.9", "distl.bins.verbose=True"],
        "bins": ["distl.bins.verbose=True"]}


def within(ours, theirs, absolute, relative) -> bool:
    if ours is None or theirs is None:
        return ours is None and theirs is None
    return abs(ours - theirs) <= max(absolute, relative * abs(theirs))


# field -> test(ours, theirs)
CHECKS = {
    "spot_total": lambda a, b: within(a, b, 2, 0.02),
    "remove_ice": lambda a, b: within(a, b, 2, 0.03),
    "in_resolution_total": lambda a, b: within(a, b, 2, 0.03),
    "good_bragg_candidates": lambda a, b: within(a, b, 3, 0.05),
    "ice_rings": lambda a, b: a == b,
    "method1_resolution": lambda a, b: within(a, b, 0.05, 0.0),
    "method2_resolution": lambda a, b: within(a, b, 0.05, 0.0),
    "max_unit_cell": lambda a, b: within(a, b, 0.0, 0.05),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refs", type=Path, default=SHARED / "reference" / "distl")
    ap.add_argument("--frames", type=Path, default=SHARED / "data" / "real")
    ap.add_argument("--sets", default="default,res4.9_bins")
    ap.add_argument("--only", default="", help="substring a frame name must contain")
    ap.add_argument("--diff", action="store_true", help="print the first differing lines of each body")
    args = ap.parse_args(argv)
    if not args.refs.is_dir() or not args.frames.is_dir():
        print("reference or frames folder missing: %s, %s" % (args.refs, args.frames))
        return 2
    summary = {}
    for line in (args.refs / "summary.jsonl").read_text().splitlines():
        rec = json.loads(line)
        summary[(rec["frame"], rec["set"])] = rec
    sets = args.sets.split(",")
    agree = {name: 0 for name in CHECKS}
    identical = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        frames = plain_frames(args.frames.rglob("*.cbf*"), Path(tmp))
        for (frame, set_name), ref in sorted(summary.items()):
            if set_name not in sets or frame not in frames or args.only not in frame:
                continue
            path = frames[frame]
            result = analyse(str(path), parse_words(SETS[set_name]))
            ours = result.as_dict()
            total += 1
            misses = [name for name, check in CHECKS.items() if not check(ours[name], ref.get(name))]
            for name in CHECKS:
                agree[name] += name not in misses
            body = format_body(result).replace(str(path.parent) + "/", "<DIR>/")
            expected = (args.refs / ("%s.%s.txt" % (frame, set_name))).read_text()
            same = body == expected
            identical += same
            status = "identical" if same else "differs"
            detail = ", ".join("%s %s/%s" % (m, ours[m], ref.get(m)) for m in misses)
            print("%-24s %-12s %-9s %s" % (frame, set_name, status, detail))
            if args.diff and not same:
                for a, b in zip(body.splitlines(), expected.splitlines()):
                    if a != b:
                        print("    ours: %r\n    dstl: %r" % (a, b))
                        break
    print()
    print("%-24s %s" % ("field", "agree / pairs"))
    for name, count in agree.items():
        print("%-24s %d / %d (%.0f%%)" % (name, count, total, 100.0 * count / max(total, 1)))
    print("%-24s %d / %d (%.0f%%)" % ("byte-identical body", identical, total, 100.0 * identical / max(total, 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
