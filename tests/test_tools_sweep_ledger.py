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


def test_sweep_only_keeps_the_named_cases_under_every_rep(tmp_path):
    """--sweep-only (what tools/seed_sweep.py --below passes) runs exactly the listed cases,
    each under every --sweep rep, and deselects the rest."""
    import shutil
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('x', [1, 2, 3])\ndef test_p(x):\n    pass\n\n"
        "def test_q():\n    pass\n")
    (tmp_path / "only.txt").write_text("test_cases.py::test_p[2]\ntest_cases.py::test_q\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--sweep=3", f"--sweep-only={tmp_path / 'only.txt'}", "-rA"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "6 passed, 6 deselected" in out, out
    assert "test_p[rep1-2]" in out and "test_p[rep1-1]" not in out, out


def test_an_assertion_a_newer_sweep_of_its_test_no_longer_logs_is_superseded(tmp_path):
    for name, date, assertion in [("seed_sweep_a", "2026-12-07T01:00:00+00:00", "old < 1e-5"),
                                  ("seed_sweep_b", "2026-12-07T02:00:00+00:00", "new < 1e-5")]:
        meta = dict(date=date, commit="abc1234", reps=10)
        with open(tmp_path / (name + ".json"), "w") as f:
            json.dump(dict(meta=meta, cases=[dict(test=CASE, assertion=assertion, ratio=0.1)]), f)
        (tmp_path / (name + ".md")).write_text("# sweep\n")
    cases = sweep_ledger.ledger(sweep_ledger.load_sweeps(str(tmp_path)))
    assert cases[(CASE, "old < 1e-5")]["superseded"]
    assert not cases[(CASE, "new < 1e-5")]["superseded"]
