"""Runs random-input tests over many seeds and records the worst error of every tolerance check.

Not part of CI. Every passing `assert a < b` / `a <= b` between numbers in the selected tests
is logged (tests/conftest.py: --sweep and GLA_EXT_ERR_LOG), then grouped per test case and
assertion; the table shows the worst value, its bound and the ratio. A case whose worst ratio
is over 0.5 needs a kernel fix or an explained tolerance (issue: "flaky tolerances").

    python tools/seed_sweep.py --reps 100 tests/test_ops_cpu.py tests/test_cpu_chunk.py
    python tools/seed_sweep.py --reps 500 -k "backward_kernel_source and norm:0.1" \\
        tests/test_cuda_chunk_emu.py --out benchmarks/results/seed_sweep_emu_bwd.md
    python tools/seed_sweep.py --reps 100 --chunk 10 tests/test_fla_integration.py --out F.md

--below N keeps only the cases of the given files that the committed sweeps' ledger
(tools/sweep_ledger.py) has run over fewer than N seeds, so the time goes where seeds are
missing (tests that record no tolerance are not run at all):

    python tools/seed_sweep.py --reps 20 --chunk 5 --below 100 tests/test_model.py --out F.md

--chunk N runs the reps as separate pytest runs of N reps each (base seeds seed, seed + 1, ...)
and rewrites --out after every one: a long sweep that is stopped keeps what it measured, and
the file says how many reps that was.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args, reps: int, seed: int) -> tuple[list[dict], str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "errors.jsonl")
        env = dict(os.environ, GLA_EXT_ERR_LOG=log,
                   PYTHONPYCACHEPREFIX=os.path.join(tmp, "pyc"))  # rewrite asserts afresh
        env["GLA_EXT_TEST_SEED"] = str(seed)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-o", "enable_assertion_pass_hook=true", f"--sweep={reps}", *args.tests]
        if args.k:
            cmd += ["-k", args.k]
        if args.only:
            only = os.path.join(tmp, "only.txt")
            with open(only, "w") as f:
                f.write("\n".join(args.only) + "\n")
            cmd += [f"--sweep-only={only}"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        elapsed = time.time() - t0
        rows = [json.loads(l) for l in open(log)] if os.path.exists(log) else []
        out = (proc.stdout + proc.stderr).strip().splitlines()
        failed = [l for l in out if l.startswith("FAILED ")]    # every one, not only the tail
        tail = "\n".join(failed + out[-15:])
        return rows, tail, elapsed


def cases_below(tests: list[str], target: int) -> list[str]:
    """Node ids (without rep) in these files that the committed sweeps ran fewer than
    `target` seeds, counting a case by its least-swept assertion still in the tests."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import sweep_ledger
    files = {t.split("::")[0] for t in tests}
    seeds: dict[str, int] = {}
    for (test, assertion), e in sweep_ledger.ledger(sweep_ledger.load_sweeps()).items():
        if (test.split("::")[0] in files and not e["superseded"]
                and sweep_ledger.still_asserted(test, assertion)):
            seeds[test] = min(seeds.get(test, e["seeds"]), e["seeds"])
    return sorted(t for t, n in seeds.items() if n < target)


def diagnostics(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows of named numbers tests recorded (tests/helpers.py record_diagnostic), per test."""
    out = collections.defaultdict(list)
    for r in rows:
        if "diagnostic" in r:
            out[_without_rep(r["test"])].append(r["diagnostic"])
    return dict(out)


def _without_rep(nodeid: str) -> str:
    import re
    return re.sub(r"\[rep\d+\]|(?<=[\[-])rep\d+-|-rep\d+(?=\])", "", nodeid)


def quantile_table(rows: list[dict], by: str) -> list[str]:
    """Rows sorted by `by`, in 5 equal groups: the mean and max of every other number."""
    rows = sorted(rows, key=lambda r: r[by])
    keys = [k for k in rows[0] if k != by]
    lines = [f"| {by} range | n | " + " | ".join(f"mean {k} | max {k}" for k in keys) + " |",
             "| --- | ---: | " + " | ".join("---: | ---:" for _ in keys) + " |"]
    n = len(rows)
    for i in range(5):
        part = rows[i * n // 5:(i + 1) * n // 5]
        if not part:
            continue
        cells = []
        for k in keys:
            vals = [r[k] for r in part]
            cells.append(f"{sum(vals) / len(vals):.3g} | {max(vals):.3g}")
        lines.append(f"| {part[0][by]:.3g} .. {part[-1][by]:.3g} | {len(part)} | " + " | ".join(cells) + " |")
    return lines


def summarize(rows: list[dict]) -> list[dict]:
    groups = collections.defaultdict(list)
    for r in rows:
        if "diagnostic" in r:
            continue
        # tolerances only (not shape or count checks); a bound of exactly 1 is an
        # error / tolerance check (tests/helpers.closest_emulated_step)
        if r["bound"] <= 0 or r["bound"] > 1:
            continue
        groups[(r["test"], r["line"], r["index"], r["assertion"])].append(r)
    out = []
    for (test, line, index, assertion), rs in groups.items():
        worst = max(rs, key=lambda r: r["value"] / r["bound"])
        values = sorted(r["value"] for r in rs)
        out.append(dict(test=test, line=line, assertion=assertion, runs=len(rs),
                        worst=worst["value"], bound=worst["bound"],
                        ratio=worst["value"] / worst["bound"],
                        median=values[len(values) // 2]))
    return sorted(out, key=lambda r: -r["ratio"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("tests", nargs="+")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("-k", default=None)
    ap.add_argument("--seed", type=int, default=None, help="base seed (default: fresh)")
    ap.add_argument("--out", default=None, help="markdown file (a .json beside it)")
    ap.add_argument("--chunk", type=int, default=0,
                    help="reps per pytest run; --out is rewritten after each (default: all in one)")
    ap.add_argument("--below", type=int, default=0,
                    help="only the cases the ledger has run over fewer seeds than this")
    args = ap.parse_args()
    args.only = cases_below(args.tests, args.below) if args.below else None
    if args.only is not None and not args.only:
        sys.exit(f"no case of {args.tests} is under {args.below} seeds in the ledger")
    if args.seed is None:     # a fresh base seed, recorded so a failure can be replayed
        args.seed = int.from_bytes(os.urandom(4), "little") >> 1
    chunk = args.chunk or args.reps
    rows, tails, elapsed, done = [], [], 0.0, 0
    while done < args.reps:
        n = min(chunk, args.reps - done)
        seed = args.seed + done // chunk
        r, tail, t = run(args, n, seed)
        rows += r
        tails.append(tail)
        elapsed += t
        done += n
        write_report(args, rows, tails, elapsed, done)


def pytest_counts(tails: list[str]) -> str:
    """The pytest result lines of every run, summed ("660 passed, 12 skipped")."""
    import re
    total = collections.Counter()
    for t in tails:
        last = t.splitlines()[-1] if t else ""
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", last):
            total[what] += int(n)
    return ", ".join(f"{n} {what}" for what, n in total.items())


def write_report(args, rows, tails, elapsed, done):
    tail = "\n".join(l for t in tails for l in t.splitlines() if l.startswith("FAILED "))
    tail = "\n".join(x for x in (tail, pytest_counts(tails)) if x)
    seeds = (f"base seed {args.seed}" if not args.chunk else
             f"base seeds {args.seed}..{args.seed + (done - 1) // args.chunk} ({args.chunk} reps each)")
    table = summarize(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=commit, cpu=cpu_model(), isa=os.environ.get("GLA_EXT_CPU_ISA", "auto"),
                reps=done, reps_asked=args.reps, chunk=args.chunk, tests=args.tests, k=args.k,
                below=args.below or None, cases_selected=len(args.only) if args.only else None,
                seconds=round(elapsed), seed=args.seed, pytest_tail=tail)
    lines = [f"# Seed sweep: {' '.join(args.tests)}" + (f" -k '{args.k}'" if args.k else "")
             + (f" (the {len(args.only)} cases under {args.below} seeds in the ledger)"
                if args.only else ""),
             "", f"{meta['date']}, commit {commit}, {meta['cpu']}, GLA_EXT_CPU_ISA={meta['isa']}, "
             f"{done} seeds per case" + (f" (of {args.reps} asked)" if done < args.reps else "")
             + f", {seeds} (--seed to replay), "
             f"{meta['seconds']} s. Worst = largest value/bound "
             "over the seeds.", "", "pytest: " + tail.splitlines()[-1] if tail else "", "",
             *[f"- `{l}`" for l in tail.splitlines() if l.startswith("FAILED ")], "",
             "| test | assertion | runs | median | worst | bound | worst/bound |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in table:
        lines.append(f"| `{r['test']}` | `{r['assertion'][:60]}` (line {r['line']}) | {r['runs']} | "
                     f"{r['median']:.3g} | {r['worst']:.3g} | {r['bound']:.3g} | {r['ratio']:.2f} |")
    diags = diagnostics(rows)
    for test, all_rows in diags.items():
        # a test may record rows of different names (one table per set of names)
        for names in dict.fromkeys(tuple(sorted(r)) for r in all_rows):
            drows = [r for r in all_rows if tuple(sorted(r)) == names]
            by = names[-1] if len(names) > 1 else None
            by = next((k for k in names if "over" in k), by)
            if by is None:
                continue
            lines += ["", f"## Diagnostics of `{test}` ({len(drows)} runs), grouped by {by}", ""]
            lines += quantile_table(drows, by)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(dict(meta=meta, cases=table, diagnostics=diags), f, indent=1)


if __name__ == "__main__":
    main()
