"""`make pull`'s check: every DVC remote the pull downloads from re-hashes what it downloads
(`verify = true`).

Without it, DVC places a remote object whose bytes changed in the workspace unnoticed, and nothing
notices afterwards (docs/sharing.md). `python -m stages.remotes [dvc pull options]`, run in the
project, exits 0 when every remote that `dvc pull` with those options would use verifies, else with
status 2 and a line per remote that does not, naming the command that turns it on in the config
file where it is off. Where no remote is configured at all, it says so and how to add one (or to
build the outputs with `make repro`) before `dvc pull` runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import sys
from typing import Any

from stages.common import PipelineError, run_main

LABEL = "make pull"
# Without any remote, `dvc pull` warns "No remote provided and no default remote set.", says
# "Everything is up to date" and then fails to check out whatever this machine's cache lacks (all
# of it, in a fresh clone), asking whether the cache is up to date: nothing says how to go on.
NO_REMOTE = ("no DVC remote is configured here, so there is nothing to download: `dvc pull` can only check out "
             "what this machine's cache holds. Add your team's remote with `dvc remote add -d NAME URL` "
             "(docs/sharing.md), or build every output here with `make repro`")
# DVC's config levels, lowest priority first (a later level wins), and how `dvc remote modify`
# names each; the project's own .dvc/config is "repo", the only one git shares.
LEVEL_OPTIONS = {"system": "--system ", "global": "--global ", "repo": "", "local": "--local "}


def last_level_setting(levels: dict[str, dict[str, Any]], remote: str, option: str) -> str | None:
    """The highest-priority config level whose section for `remote` sets `option`, or None.
    `levels`: level name -> that file's config as DVC reads it, lowest priority first."""
    found = None
    for level, config in levels.items():
        if option in config.get("remote", {}).get(remote, {}):
            found = level
    return found


def advice(remote: str, levels: dict[str, dict[str, Any]], files: dict[str, str]) -> str:
    """The line for a remote whose verify is off: where it is off, and the command that turns it on
    where that takes effect (the level that sets verify last, else the one that defines the remote)."""
    verify_level = last_level_setting(levels, remote, "verify")
    level = verify_level or last_level_setting(levels, remote, "url") or "repo"
    where = f"false in {files[level]}" if verify_level else "unset: DVC's default"
    command = f"dvc remote modify {LEVEL_OPTIONS[level]}{shlex.quote(remote)} verify true"
    fix = (f"turn it on for everyone: {command} && git commit .dvc/config" if level == "repo"
           else f"turn it on in {files[level]}: {command}")
    return f"remote '{remote}' has verify off ({where}), so a corrupt download would go unnoticed; {fix}"


def parsed_pull_args(pull_args: list[str]) -> Any:
    """`dvc pull PULL_ARGS`'s options as DVC's own parser reads them (abbreviations, bundled flags),
    or None where they ask for help (`-h`, `--he`, `-fh`): `dvc pull` then prints it and pulls
    nothing. An option `dvc pull` does not take exits with status 2 after DVC's ERROR line (its
    usage text, on stdout, is left to `dvc pull`, which would print it a second time)."""
    from dvc.cli import DvcParserError, parse_args

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return parse_args(["pull", *pull_args])
    except DvcParserError:
        sys.exit(2)  # DVC has logged what is wrong
    except SystemExit:  # help
        return None


def read_config() -> Any:
    """The working directory's DVC config as DVC reads it: every level merged, defaults filled in,
    checked (a config DVC cannot read is one line)."""
    from dvc.config import Config, ConfigError

    try:
        return Config.from_cwd()
    except ConfigError as exc:
        raise PipelineError(f"DVC's config: {exc}") from None


def pulled_remotes(args: Any, config: Any) -> set[str]:
    """The remotes `dvc pull` with the parsed options `args` downloads from, as DVC chooses them:
    the one `-r` names (outputs pinned to another remote are then skipped); else the default
    remote and every remote an output of the workspace pins (`remote:` in dvc.yaml); with -a, -T
    or -A (other commits, whose outputs may pin others) every remote."""
    if args.remote:
        return {args.remote}
    if args.all_branches or args.all_tags or args.all_commits:
        return set(config["remote"])
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            pinned = {out.remote for out in repo.index.outs if out.remote}
    except DvcException:
        return set(config["remote"])  # a pipeline DVC cannot read: `dvc pull` will say why
    default = config["core"].get("remote")
    return pinned | ({default} if default else set())


def unverified_remotes(args: Any, config: Any) -> list[str]:
    """One advice line, by name, for each remote that `dvc pull` with the parsed options `args`
    would download from and whose verify is off. A name that no config defines is left to
    `dvc pull` to report, as is a pull that names no remote at all."""
    from dvc.config import Config

    files = {level: os.path.relpath(path) if level in ("repo", "local") else path
             for level, path in config.files.items()}
    levels = {level: config.load_one(level) for level in Config.LEVELS if level in config.files}
    used = pulled_remotes(args, config)
    return [advice(name, levels, files) for name, remote in sorted(config["remote"].items())
            if name in used and not remote.get("verify", False)]


def no_remote_configured(config: Any) -> bool:
    """Whether no config level (system, global, the repository's, local) defines a remote or names a
    default one (a default that no level defines: `dvc pull` says "remote '...' doesn't exist")."""
    return not config["remote"] and not config["core"].get("remote")


def main() -> None:
    # The options parsed and the config read once here: the check and the note see the same.
    args = parsed_pull_args(sys.argv[1:])
    if args is None:
        return  # help: `dvc pull` prints it and pulls nothing
    config = read_config()
    lines = unverified_remotes(args, config)
    for line in lines:
        print(f"{LABEL}: {line}", flush=True)
    if lines:
        sys.exit(2)
    if no_remote_configured(config):
        print(f"{LABEL}: {NO_REMOTE}", flush=True)  # a note, not an error: the pull may still check out


if __name__ == "__main__":
    run_main(LABEL, main)
