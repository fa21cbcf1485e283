"""Shared by the benchmark scripts: machine description and saving results (device, commit, date)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def thread_cpu_min(fn, repeats: int) -> float:
    """Min over repeats of fn()'s thread CPU seconds (less disturbed by a loaded machine)."""
    from gla_ext._timing import best_seconds   # the scripts put this repository on sys.path
    return best_seconds(fn, repeats, time.thread_time)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save_results(name: str, rows: list[dict], table: str, extra: dict | None = None,
                 out_dir: str | None = None) -> str:
    """Writes <name>.json (rows + machine + commit + date) and <name>.md (the printed table)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    meta = {"benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine()}
    if extra:
        meta.update(extra)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# {name}\n\n{meta['date']}, commit {meta['commit']}, "
                f"{meta['machine'].get('gpu') or meta['machine']['cpu']}, "
                f"torch {meta['machine']['torch']}, {meta['machine']['cpu_threads']} threads\n\n")
        f.write("```\n" + table + "\n```\n")
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message) when not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt
