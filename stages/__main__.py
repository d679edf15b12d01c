"""`python -m stages NAME ARGS...` runs stage NAME as `python -m stages.NAME ARGS...` does; stages/run
starts every stage of dvc.yaml this way.

What it adds is the first and the last second: importing a stage (torch, scikit-learn) takes 2-5 s,
and Ctrl-C or SIGTERM there printed Python's traceback or nothing at all; here either is one line,
as later (stages.common.run_main), and under DVC the stage is tied to DVC's life before those
imports. After a stage succeeds, Python's teardown of torch and the rest took another 0.8 s, in
which Ctrl-C printed nothing and ended the stage with status -2 (a signal's death): here it exits
at once once its outputs are written, and a signal in the last moments is one line too.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import runpy
import signal
import sys

from stages.common import interruption, log, raise_terminated, stop_with_parent, stopped_by  # no torch: no delay


# What it runs: the stages of dvc.yaml (tests/test_stage_deps.py keeps the two lists alike) and predict.
# The other modules of stages/ are libraries (run as one, `models` did nothing and exited 0) or have
# their own command (`python -m stages.presets`, `python -m stages.remotes`).
STAGES = ("params", "fetch", "preprocess", "augment", "train", "evaluate", "plot", "predict")
USAGE = f"usage: python -m stages NAME [ARGS...]   (NAME: {' | '.join(STAGES)}; NAME --help for its own)"


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        return
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(USAGE)
    stage, module = sys.argv[1], f"stages.{sys.argv[1]}"
    if stage not in STAGES:
        sys.exit(f"python -m stages: no stage {stage!r} (one of {', '.join(STAGES)})")
    signal.signal(signal.SIGTERM, raise_terminated)
    if "DVC_ROOT" in os.environ:
        stop_with_parent()
    sys.argv = [module, *sys.argv[2:]]
    try:
        # The stage's imports, then its run_main, which tells every later interruption itself
        # (and exits through SystemExit(1) or another failing status, which passes here).
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except ModuleNotFoundError as exc:
        # stages/run fell back to a python3 without the project's packages (no .venv in this copy):
        # Python's traceback ends deep in a stage's imports and says none of that. A package this
        # Python has, failing to import a part of itself, or the project's own module: a traceback.
        if not lacks_package(exc.name):
            raise
        log(stage, f"error: {sys.executable} has no module '{exc.name}': it lacks the project's packages; "
                   "`make setup` installs them into .venv (which stages/run prefers), or activate the environment "
                   "that has them")
        sys.exit(1)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Terminated
        stopped, status = interruption(exc)
        log(stage, f"{stopped} while starting; nothing was written")
        sys.exit(status)
    except SystemExit as exc:  # a failure's status passes; exit 0 (torchrun's launch, --help) ends as a success
        if exc.code not in (0, None):
            raise
    finish(stage)


def lacks_package(name: str | None) -> bool:
    """Whether the module `name`, which an import did not find, is a package this Python lacks (its
    top-level name found nowhere, or a namespace's part: ruamel.yaml beside another ruamel.*), not
    one it has failing inside, nor the project's own."""
    top = (name or "stages").partition(".")[0]
    if top == "stages":
        return False
    try:
        spec = importlib.util.find_spec(top)
        return spec is None or (spec.origin is None and importlib.util.find_spec(name) is None)
    except Exception:  # a package there whose import fails: its traceback says more
        return False


def finish(stage: str) -> None:
    """Ends a stage that succeeded: atexit's functions, the standard streams flushed, and exit 0,
    without the teardown of every module (what os._exit skips; nothing is left to write, every
    output is complete and closed). A signal meanwhile: one line and the signal's status, so that
    DVC stops instead of recording the stage and going on to the next."""
    def stopped_while_exiting(signum: int, frame: object) -> None:
        stopped, status = stopped_by(signum)
        log(stage, f"{stopped} while exiting; its outputs were complete, but DVC does not record a stage "
                   "that did not exit 0")
        sys.stdout.flush()
        os._exit(status)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started in a script's background: left ignored
        signal.signal(signal.SIGINT, stopped_while_exiting)
    signal.signal(signal.SIGTERM, stopped_while_exiting)
    atexit._run_exitfuncs()  # what the libraries registered, as a normal exit runs them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
