"""`python -m stages NAME ARGS...` runs stage NAME as `python -m stages.NAME ARGS...` does; stages/run
starts every stage of dvc.yaml this way.

What it adds is the first seconds: importing a stage (torch, scikit-learn) takes 2-5 s, and Ctrl-C
or SIGTERM there printed Python's traceback or nothing at all; here either is one line, as later
(stages.common.run_main), and under DVC the stage is tied to DVC's life before those imports.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import signal
import sys

from stages.common import interruption, log, raise_terminated, stop_with_parent  # no torch: no delay


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m stages NAME [ARGS...]   (NAME: a stage's module in stages/, e.g. train)")
    stage, module = sys.argv[1], f"stages.{sys.argv[1]}"
    # A dotted name (`train.py`) would make find_spec import stages.train, torch and all, first.
    if "." in stage or importlib.util.find_spec(module) is None:
        sys.exit(f"python -m stages: no stage {stage!r} (a module of stages/, e.g. train)")
    signal.signal(signal.SIGTERM, raise_terminated)
    if "DVC_ROOT" in os.environ:
        stop_with_parent()
    sys.argv = [module, *sys.argv[2:]]
    try:
        # The stage's imports, then its run_main, which tells every later interruption itself
        # (and exits through SystemExit, which passes here).
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated
        stopped, status = interruption(exc)
        log(stage, f"{stopped} while starting; nothing was written")
        sys.exit(status)


if __name__ == "__main__":
    main()
