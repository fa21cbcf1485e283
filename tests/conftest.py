"""Seeds every test's random inputs so that a failure can be replayed exactly.

Each run draws fresh inputs (docs/design.md "Numerics"): the base seed is random unless
given, and every test's own seed is derived from the base seed and the test's node id, so
one test replays alone with the same inputs it had in the full run:

    GLA_EXT_TEST_SEED=<base> python -m pytest 'tests/test_x.py::test_y[case]'
    python -m pytest --seed <base> 'tests/test_x.py::test_y[case]'

torch's default generator, Python's `random` and numpy's legacy global generator are
seeded before each test. A failing test's report names its base seed and the replay command.

For the tolerance sweep (tools/seed_sweep.py, not run in CI): `--sweep N` runs every selected
test N times with N different seeds, and with GLA_EXT_ERR_LOG=<file> (and pytest's
`-o enable_assertion_pass_hook=true`) every passing `assert a < b` / `a <= b` between numbers
is appended to <file> as a JSON line, so the worst error per case can be read off.
`--sweep-only FILE` keeps only the cases named in FILE (the ledger's cases short of a target).
"""
from __future__ import annotations

import json
import os
import random
import re
import zlib

import pytest
import torch

SEED_ENV = "GLA_EXT_TEST_SEED"
ERR_LOG_ENV = "GLA_EXT_ERR_LOG"


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help=f"base seed of the random test inputs (default: ${SEED_ENV}, else fresh)")
    parser.addoption("--sweep", type=int, default=0,
                     help="run every selected test this many times, each with its own seed")
    parser.addoption("--sweep-only", default=None, metavar="FILE",
                     help="keep only the test cases whose node ids (without the sweep's repN) "
                          "are lines of FILE (tools/seed_sweep.py --below)")


def pytest_configure(config):
    base = config.getoption("--seed")
    if base is None and os.environ.get(SEED_ENV):
        try:
            base = int(os.environ[SEED_ENV])
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV} must be an integer, got {os.environ[SEED_ENV]!r}")
    if base is None:
        base = random.SystemRandom().randrange(2**31)
    config._gla_base_seed = base


def pytest_report_header(config):
    return f"random inputs: base seed {config._gla_base_seed} (replay: {SEED_ENV}={config._gla_base_seed})"


def test_seed(base: int, nodeid: str) -> int:
    """The seed of one test: a function of the base seed and the node id only."""
    return (base + zlib.crc32(nodeid.encode())) % 2**31


test_seed.__test__ = False  # not a test


def pytest_generate_tests(metafunc):
    reps = metafunc.config.getoption("--sweep")
    if reps > 0:
        metafunc.parametrize("_sweep_rep", range(reps), indirect=True,
                             ids=[f"rep{i}" for i in range(reps)])


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--sweep-only")
    if not path:
        return
    with open(path) as f:
        wanted = {line.strip() for line in f if line.strip()}
    keep = [it for it in items if _without_rep(it.nodeid) in wanted]
    config.hook.pytest_deselected(items=[it for it in items if _without_rep(it.nodeid) not in wanted])
    items[:] = keep


@pytest.fixture(autouse=True)
def _sweep_rep(request):  # the repetition number under --sweep (part of the node id, so of the seed)
    return getattr(request, "param", 0)


# "1.2e-06 < 1e-05" or "1.2e-06 <= 1e-05" inside an assertion's explanation
_NUMBER_COMPARISON = re.compile(
    r"(-?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan))\s*(<=|<)\s*(-?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf))")


def _without_rep(nodeid):
    return re.sub(r"\[rep\d+\]|(?<=[\[-])rep\d+-|-rep\d+(?=\])", "", nodeid)


def pytest_assertion_pass(item, lineno, orig, expl):
    path = os.environ.get(ERR_LOG_ENV)
    if not path:
        return
    first = expl.splitlines()[0] if expl else ""
    with open(path, "a") as f:
        for i, (lhs, op, rhs) in enumerate(_NUMBER_COMPARISON.findall(first)):
            f.write(json.dumps(dict(test=_without_rep(item.nodeid),
                                    line=lineno, index=i, assertion=orig, value=float(lhs),
                                    op=op, bound=float(rhs))) + "\n")


@pytest.fixture(autouse=True)
def _seeded_random_inputs(request, _sweep_rep):
    seed = test_seed(request.config._gla_base_seed, request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        base = item.config._gla_base_seed
        report.sections.append((
            "random seed",
            f"base seed {base}, this test's seed {test_seed(base, item.nodeid)}; replay:\n"
            f"  {SEED_ENV}={base} python -m pytest '{item.nodeid}'"))
