"""Ledger of the seed sweeps: every tolerance case, how many seeds it has run over in all the
committed sweeps (benchmarks/results/seed_sweep_*.json) and its worst value / bound.

Issue 21's target is 100 seeds per random-input case with the worst error <= 0.5x its bound
(or the case explained). This lists, per test file, the cases still short of 100 seeds and
those over 0.5, so the next sweep can be aimed at them. Not part of CI.

    python tools/sweep_ledger.py [--out docs/seed_sweeps_ledger.md] [--target 100]
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_sweeps(results: str = os.path.join(ROOT, "benchmarks", "results")) -> list[dict]:
    """Every sweep's meta and cases: from its .json, or parsed from the .md of older sweeps
    that saved none (their assertions are cut at 60 characters there)."""
    sweeps = []
    for path in sorted(glob.glob(os.path.join(results, "seed_sweep_*.md"))):
        js = os.path.splitext(path)[0] + ".json"
        if os.path.exists(js):
            with open(js) as f:
                data = json.load(f)
        else:
            data = parse_markdown(path)
        data["file"] = os.path.basename(js if os.path.exists(js) else path)
        sweeps.append(data)
    return sweeps


def parse_markdown(path: str) -> dict:
    text = open(path).read()
    reps = re.search(r"(\d+) seeds per case", text)
    date = re.search(r"^(\d{4}-\d\d-\d\d[T\d:+]*)", text, re.M)
    commit = re.search(r"commit (\w+)", text)
    cases = []
    for m in re.finditer(r"^\| `([^`]+)` \| `([^`]*)` \(line \d+\) \| (\d+) \| [^|]+ \| [^|]+ \| "
                         r"[^|]+ \| ([\d.]+) \|$", text, re.M):
        cases.append(dict(test=m.group(1), assertion=m.group(2), ratio=float(m.group(4))))
    return dict(meta=dict(reps=int(reps.group(1)) if reps else 0, date=date.group(1) if date else "",
                          commit=commit.group(1) if commit else "?"), cases=cases)


def ledger(sweeps: list[dict]) -> dict[tuple[str, str], dict]:
    """(test, assertion) -> seeds (sum of the sweeps' reps), the worst ratio over all of them,
    and the newest sweep's worst ratio (a test or kernel fixed after an older sweep shows there)."""
    cases: dict[tuple[str, str], dict] = {}
    test_last: dict[str, int] = {}     # test -> position of the newest sweep that logged it
    for order, s in enumerate(sorted(sweeps, key=_sweep_order)):
        reps = s["meta"]["reps"]
        for c in s["cases"]:
            test_last[c["test"]] = order
            key = (c["test"], c["assertion"][:60])
            e = cases.setdefault(key, dict(seeds=0, ratio=0.0, worst_in=None, sweeps=[]))
            e["last_order"] = order
            e["seeds"] += reps
            e["sweeps"].append(s["file"])
            e["latest"], e["latest_in"] = c["ratio"], f"{s['file']} ({s['meta']['commit']})"
            if c["ratio"] >= e["ratio"]:
                e["ratio"], e["worst_in"] = c["ratio"], f"{s['file']} ({s['meta']['commit']})"
    for (test, _), e in cases.items():
        # a newer sweep ran this test and no longer logged this assertion: the test changed
        # since (its text may still be elsewhere in the file)
        e["superseded"] = test_last[test] > e["last_order"]
    return cases


def _sweep_order(sweep: dict) -> tuple:
    """Sweeps in the order of the code they ran: their commit's time (older sweeps' markdown
    gives a date without a time), then their date."""
    commit = str(sweep["meta"].get("commit", "")).split("-")[0]
    try:
        t = int(subprocess.run(["git", "log", "-1", "--format=%ct", commit], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        t = 0
    return (t, sweep["meta"]["date"])


def still_asserted(test: str, assertion: str) -> bool:
    """Whether the test file (or a helper module beside it) still has this assertion (a
    tolerance changed since the sweep makes its old rows history, not today's test)."""
    if not os.path.exists(os.path.join(ROOT, test.split("::")[0])):
        return False
    return any(assertion in _source(p) for p in glob.glob(os.path.join(ROOT, "tests", "*.py")))


def collected_ids() -> set[str] | None:
    """The test ids pytest collects today (`pytest --collect-only -q tests`): a case whose id
    is gone (a parameter renamed or removed) is history, even where its assertion's text
    survives under a new id. None when collection fails (nothing is retired then)."""
    import sys
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    ids = {line.strip() for line in run.stdout.splitlines() if "::" in line}
    if run.returncode != 0 or not ids:
        print(f"[sweep_ledger] pytest --collect-only failed (rc {run.returncode}); no case is "
              f"retired for a vanished id:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        return None
    return ids


_SOURCES: dict[str, str] = {}


def _source(path: str) -> str:
    if path not in _SOURCES:
        with open(path) as f:
            _SOURCES[path] = f.read()
    return _SOURCES[path]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-collect", action="store_true",
                    help="keep cases whose test id pytest no longer collects")
    args = ap.parse_args()
    sweeps = load_sweeps()
    cases = ledger(sweeps)
    ids = None if args.no_collect else collected_ids()
    per_file = collections.defaultdict(list)
    gone = []
    for (test, assertion), e in cases.items():
        if (e["superseded"] or not still_asserted(test, assertion) or
                (ids is not None and test not in ids)):
            gone.append((test, assertion, e))
            continue
        per_file[test.split("::")[0]].append((test, assertion, e))
    lines = ["# Seed sweep ledger", "",
             f"From {len(sweeps)} committed sweeps (benchmarks/results/seed_sweep_*.json; "
             "`python tools/sweep_ledger.py`). Seeds = the sum of the reps of every sweep that ran "
             "the case (sweeps ran at different commits: see each file). Target: "
             f"{args.target} seeds, worst <= 0.5 of the bound.", "",
             "| test file | cases | fewest seeds | most seeds | cases under target | worst ratio (any sweep) | cases over 0.5 in their newest sweep |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    over = []
    for f in sorted(per_file):
        rows = per_file[f]
        seeds = [e["seeds"] for _, _, e in rows]
        hi = [r for r in rows if r[2]["latest"] > 0.5]
        over += hi
        lines.append(f"| `{f}` | {len(rows)} | {min(seeds)} | {max(seeds)} | "
                     f"{sum(s < args.target for s in seeds)} | "
                     f"{max(e['ratio'] for _, _, e in rows):.2f} | {len(hi)} |")
    lines += ["", "## Cases over 0.5 of their bound in their newest sweep", "",
              "| test | assertion | seeds | newest ratio | newest sweep | worst ratio | worst in |",
              "| --- | --- | ---: | ---: | --- | ---: | --- |"]
    for test, assertion, e in sorted(over, key=lambda r: -r[2]["latest"]):
        lines.append(f"| `{test}` | `{assertion[:60]}` | {e['seeds']} | {e['latest']:.2f} | "
                     f"{e['latest_in']} | {e['ratio']:.2f} | {e['worst_in']} |")
    hist = sorted(((t, a, e) for (t, a), e in cases.items() if e["ratio"] > 0.5 >= e["latest"]),
                  key=lambda r: -r[2]["ratio"])
    lines += ["", "## Cases over 0.5 only in an older sweep (fixed since: see the commits)", "",
              "| test | assertion | worst ratio | worst in | newest ratio | newest sweep |",
              "| --- | --- | ---: | --- | ---: | --- |"]
    for test, assertion, e in hist:
        lines.append(f"| `{test}` | `{assertion[:60]}` | {e['ratio']:.2f} | {e['worst_in']} | "
                     f"{e['latest']:.2f} | {e['latest_in']} |")
    lines += ["", f"{len(gone)} swept assertions are no longer in their test files "
              "(tolerances or tests changed since, a newer sweep of their test no longer logged "
              "them, or pytest no longer collects their test id) and are left out above."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
