"""Seeds every test's random inputs so that a failure can be replayed exactly.

Each run draws fresh inputs (docs/design.md "Numerics"): the base seed is random unless
given, and every test's own seed is derived from the base seed and the test's node id, so
one test replays alone with the same inputs it had in the full run:

    GLA_EXT_TEST_SEED=<base> python -m pytest 'tests/test_x.py::test_y[case]'
    python -m pytest --seed <base> 'tests/test_x.py::test_y[case]'

torch's default generator, Python's `random` and numpy's legacy global generator are
seeded before each test. A failing test's report names its base seed and the replay command.
"""
from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

SEED_ENV = "GLA_EXT_TEST_SEED"


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help=f"base seed of the random test inputs (default: ${SEED_ENV}, else fresh)")


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


@pytest.fixture(autouse=True)
def _seeded_random_inputs(request):
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
