"""Prints the CPU instruction-set paths (GLA_EXT_CPU_ISA values) this machine can run, one per
line: the auto-detected one first, then the others. A path the CPU lacks is left out (asking
for it would silently run the best available one, which the first run already covers)."""
import os
import sys

import gla_ext
from gla_ext import cpu_linear

if not gla_ext.extension_loaded():
    sys.exit("gla_ext._C did not load: " + str(gla_ext._ext.LOAD_ERROR))
os.environ.pop("GLA_EXT_CPU_ISA", None)
auto = cpu_linear.isa()
paths = [auto]
for name in ("avx512", "avx2", "generic"):
    os.environ["GLA_EXT_CPU_ISA"] = name
    if cpu_linear.isa() == name and name not in paths:
        paths.append(name)
print("\n".join(paths))
