"""tools/sweep_ledger.py adds sweeps up per case (issue 21's seed ledger)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import sweep_ledger  # noqa: E402

CASE = "tests/test_reference.py::test_chunked_matches_naive[x]"


def _write_json(d, name, date, reps, ratio):
    meta = dict(date=date, commit="abc1234", reps=reps)
    case = dict(test=CASE, assertion="rel_err(o2, o1) < 1e-12", ratio=ratio)
    with open(os.path.join(d, name + ".json"), "w") as f:
        json.dump(dict(meta=meta, cases=[case]), f)
    open(os.path.join(d, name + ".md"), "w").write("# sweep\n")


def test_seeds_add_up_and_the_newest_ratio_is_kept(tmp_path):
    _write_json(tmp_path, "seed_sweep_a", "2026-12-07T01:00:00+00:00", 30, 0.9)
    _write_json(tmp_path, "seed_sweep_b", "2026-12-07T02:00:00+00:00", 40, 0.2)
    # an older sweep that saved only markdown
    (tmp_path / "seed_sweep_c.md").write_text(
        "# Seed sweep\n\n2026-12-07T00:30:00+00:00, commit 0001111, AMD, 5 seeds per case, x\n\n"
        f"| `{CASE}` | `rel_err(o2, o1) < 1e-12` (line 19) | 5 | 1e-16 | 2e-16 | 1e-12 | 0.40 |\n")
    cases = sweep_ledger.ledger(sweep_ledger.load_sweeps(str(tmp_path)))
    e = cases[(CASE, "rel_err(o2, o1) < 1e-12")]
    assert e["seeds"] == 75
    assert e["ratio"] == 0.9 and e["worst_in"].startswith("seed_sweep_a.json")
    assert e["latest"] == 0.2 and e["latest_in"].startswith("seed_sweep_b.json")


def test_assertions_gone_from_the_tests_are_recognised():
    assert sweep_ledger.still_asserted("tests/test_reference.py", "rel_err(o2, o1) < 1e-12")
    missing = "".join(["no such ", "assertion < 1"])   # not spelled out: this file is searched too
    assert not sweep_ledger.still_asserted("tests/test_reference.py", missing)
    assert not sweep_ledger.still_asserted("tests/no_such_file.py", "rel_err(o2, o1) < 1e-12")
