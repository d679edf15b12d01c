"""`make pull`'s checks: every DVC remote the pull downloads from re-hashes what it downloads
(`verify = true`), and no directory's manifest (`.dir`) that arrived is damaged.

Without verify, DVC places a remote object whose bytes changed in the workspace unnoticed, and
nothing notices afterwards (docs/sharing.md). `python -m stages.remotes [dvc pull options]`, run in
the project, exits 0 when every remote that `dvc pull` with those options would use verifies, else
with status 2 and a line per remote that does not, naming the command that turns it on in the
config file where it is off. Where no remote is configured at all, it says so and how to add one
(or to build the outputs with `make repro`) before `dvc pull` runs.

Even with verify, a damaged manifest (the `.dir` object that lists a directory output's files:
data/raw, metrics/train) reached the workspace as a file of another name, or another file: verify
drops it as it arrives, but `dvc pull` checks the directory out from the listing the download read,
and any checkout reads a manifest the cache lacks from the remote. `python -m stages.remotes --pull
[dvc pull options]` (make pull) therefore pulls as two commands after the checks, `dvc fetch` and
then `dvc checkout`, and leaves out of the checkout every output whose manifest did not arrive or
is damaged in the cache (checked against its name, the md5 of its bytes): each is named with its
repair, and the pull exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from stages.common import PipelineError, run_main

LABEL = "make pull"
USAGE = ("usage: python -m stages.remotes [--pull] [dvc pull options]   (`dvc pull -h` lists the options)\n\n"
         + __doc__.strip())
# Without any remote, `dvc pull` warns "No remote provided and no default remote set.", says
# "Everything is up to date" and then fails to check out whatever this machine's cache lacks (all
# of it, in a fresh clone), asking whether the cache is up to date: nothing says how to go on.
NO_REMOTE = ("no DVC remote is configured here, so there is nothing to download: `dvc pull` can only check out "
             "what this machine's cache holds. Add your team's remote with `dvc remote add -d NAME URL` "
             "(docs/sharing.md), or build every output here with `make repro`")
# Remotes exist, but none is the default and the pull names none (-r): `dvc fetch` then says "No
# remote provided and no default remote set." and downloads nothing.
NO_DEFAULT = ("no default DVC remote, and the pull names none, so nothing is downloaded: name one with "
              "PULL_ARGS=\"-r NAME\", or make it the default: `dvc remote default NAME`")
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


def unverified_remotes(used: set[str], config: Any) -> list[str]:
    """One advice line, by name, for each remote of `used` (pulled_remotes: those `dvc pull`
    downloads from) whose verify is off. A name that no config defines is left to
    `dvc pull` to report, as is a pull that names no remote at all."""
    from dvc.config import Config

    files = {level: os.path.relpath(path) if level in ("repo", "local") else path
             for level, path in config.files.items()}
    levels = {level: config.load_one(level) for level in Config.LEVELS if level in config.files}
    return [advice(name, levels, files) for name, remote in sorted(config["remote"].items())
            if name in used and not remote.get("verify", False)]


def no_remote_configured(config: Any) -> bool:
    """Whether no config level (system, global, the repository's, local) defines a remote or names a
    default one (a default that no level defines: `dvc pull` says "remote '...' doesn't exist")."""
    return not config["remote"] and not config["core"].get("remote")


# `dvc pull` is `dvc fetch` then `dvc checkout`; pull's options, by the attribute DVC's parser
# stores them in, as each of the two takes them (flags, then options with a value). Targets go to
# both, --glob's patterns expanded once (pull_targets). A test checks that each round-trips.
FETCH_FLAGS = {"all_branches": "-a", "all_tags": "-T", "all_commits": "-A", "with_deps": "-d", "recursive": "-R",
               "run_cache": "--run-cache"}  # off by default in both commands
FETCH_VALUES = {"jobs": "-j", "remote": "-r"}
CHECKOUT_FLAGS = {"with_deps": "-d", "recursive": "-R", "force": "-f", "allow_missing": "--allow-missing"}


def pull_targets(args: Any) -> list[str]:
    """The targets of the parsed `dvc pull` options `args`, --glob's patterns expanded as pull
    expands them (a pattern that matches nothing is a PipelineError, as DVC's own error)."""
    from dvc.exceptions import DvcException
    from dvc.utils import glob_targets

    try:
        return glob_targets(args.targets, glob=args.glob) if args.targets else []
    except DvcException as exc:
        raise PipelineError(str(exc)) from None


def half_argv(args: Any, command: str, flags: dict[str, str], values: dict[str, str],
              targets: list[str] | None = None) -> list[str]:
    """`dvc COMMAND`'s arguments for its half of the parsed `dvc pull` options `args`, for
    `targets` (None: the pull's own)."""
    argv = [command, *["-q"] * args.quiet, *["-v"] * args.verbose]
    argv += [flag for name, flag in flags.items() if getattr(args, name)]
    for name, option in values.items():
        if getattr(args, name) is not None:
            argv += [option, str(getattr(args, name))]
    targets = pull_targets(args) if targets is None else targets
    return argv + (["--", *targets] if targets else [])


def damaged_manifests(cache: Path) -> list[Path]:
    """The directory manifests (`<2 hex>/<30 hex>.dir`) in the cache directory `cache` (DVC's
    files/md5) whose bytes do not hash to their name: DVC names each by the md5 of its bytes."""
    return [path for path in sorted(cache.glob("??/*.dir"))
            if hashlib.md5(path.read_bytes()).hexdigest() != path.parent.name + path.name.removesuffix(".dir")]


def repair(md5: str) -> str:
    return (f"repair the remote from a clone that has a good copy: delete files/md5/{md5[:2]}/{md5[2:]} under "
            "the remote's URL, then `dvc push` there; until then `dvc pull`, `dvc checkout` and `dvc repro` "
            "would put the damaged listing in the workspace (DVC reads a manifest the cache lacks from the "
            "remote): use make pull (docs/sharing.md)")


def pull_outputs(args: Any) -> tuple[Path, dict[str, list[Any]]]:
    """(DVC's local cache of file objects, files/md5, wherever the config puts it; pull target ->
    the outputs `dvc pull` with the parsed options `args` checks out for it, "" for a pull of
    every output). No outputs for a target DVC does not know: `dvc fetch` and `dvc checkout` say
    so in their own words."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with Repo() as repo:
        cache = Path(repo.cache.local.path)
        try:
            return cache, {target: list(repo.index.targets_view(target or None, with_deps=args.with_deps,
                                                                recursive=args.recursive).outs)
                           for target in pull_targets(args) or [""]}
        except DvcException:
            return cache, {}


def remove_damaged_manifests(cache: Path) -> set[str]:
    """Removes the damaged manifests of the cache (damaged_manifests) and returns their names
    (md5 + ".dir"). Before the download, so that it fetches them again: DVC takes one that is
    in the cache as it is (one a pull without verify placed)."""
    removed = set()
    for path in damaged_manifests(cache):
        path.unlink()
        removed.add(path.parent.name + path.name)
    return removed


def manifest_problems(outs: dict[str, list[Any]], cache: Path, fetched: bool, removed: set[str]) -> dict[str, str]:
    """Output -> the line saying why, for the outputs of `outs` (pull_outputs) whose directory
    manifest (`.dir`) the cache lacks: after a download (`fetched`), one that did not
    arrive intact (DVC's verify drops a damaged manifest as it arrives, yet checks the directory out
    from the listing it read, and any checkout reads a manifest the cache lacks from the remote);
    without one, one of `removed` (damaged in the cache). Outputs that share a manifest (the same
    files) share its problem."""
    manifests: dict[str, set[str]] = {}
    for out in (out for target_outs in outs.values() for out in target_outs):
        if out.use_cache and out.hash_info and out.hash_info.isdir:
            manifests.setdefault(out.hash_info.value, set()).add(str(out))
    problems = {}
    for md5, outputs in manifests.items():
        if (cache / md5[:2] / md5[2:]).exists():
            continue
        if fetched:
            why = (f"its manifest {md5} did not arrive intact (`dvc fetch -v` says 'corrupted cache file' where DVC's "
                   f"verify dropped a damaged one) or the remote lacks it; {repair(md5)}")
        elif md5 in removed:
            why = (f"its manifest {md5} was damaged in the cache (its bytes do not hash to its name): removed; "
                   "`make pull` from a remote downloads it again")
        else:
            continue  # never here: `dvc checkout` says it is not in the cache
        problems.update({output: f"{output}: {why}" for output in outputs})
    return problems


def sound_targets(outs: dict[str, set[str]], problems: dict[str, str]) -> list[str]:
    """The checkout's targets without the outputs in `problems`: each pull target (`outs`: target ->
    the outputs it checks out) as given where none of its outputs has a problem, else its other
    outputs (a pull of everything: "")."""
    kept: list[str] = []
    for target, outputs in outs.items():
        if target and not outputs & problems.keys():
            kept.append(target)
        else:
            kept += sorted(output for output in outputs - problems.keys() if output not in kept)
    return kept


def run_dvc(argv: list[str]) -> int:
    print(f"{LABEL}: dvc {shlex.join(argv)}", flush=True)
    return subprocess.run([sys.executable, "-m", "dvc", *argv]).returncode


def pull(args: Any, fetch: bool) -> int:
    """`dvc pull` with the parsed options `args`, as `dvc fetch` (when `fetch`) and then `dvc
    checkout`, leaving out every output whose directory manifest is not sound: the exit status,
    2 when an output was left out, else 1 when fetch or checkout failed (as `dvc pull`)."""
    cache, outs = pull_outputs(args)
    removed = remove_damaged_manifests(cache)
    for md5 in sorted(removed):
        print(f"{LABEL}: the manifest {md5} in the cache was damaged (its bytes do not hash to its name): removed"
              + (", to be downloaded again" if fetch else ""), flush=True)
    if fetch and run_dvc(half_argv(args, "fetch", FETCH_FLAGS, FETCH_VALUES)):
        return 1  # DVC has said why
    problems = manifest_problems(outs, cache, fetch, removed)
    for output in sorted(problems):
        print(f"{LABEL}: {problems[output]}; not checked out (what is there now stays as it was)", flush=True)
    if not problems:
        return 1 if run_dvc(half_argv(args, "checkout", CHECKOUT_FLAGS, {})) else 0
    targets = sound_targets({target: {str(out) for out in target_outs} for target, target_outs in outs.items()},
                            problems)
    if targets:
        # -d and -R would add back what was left out: each target is explicit here.
        run_dvc(half_argv(argparse.Namespace(**{**vars(args), "with_deps": False, "recursive": False}),
                          "checkout", CHECKOUT_FLAGS, {}, targets))
    return 2


def main() -> None:
    argv = sys.argv[1:]
    pulls = argv[:1] == ["--pull"]  # make pull's: the checks, then the pull itself
    # The options parsed and the config read once here: the check and the note see the same.
    args = parsed_pull_args(argv[1:] if pulls else argv)
    if args is None:
        if pulls:  # help: `dvc pull` prints it and pulls nothing
            sys.exit(subprocess.run([sys.executable, "-m", "dvc", "pull", *argv[1:]]).returncode)
        print(USAGE)  # the check alone, asked for help: what it checks, and where the options come from
        return
    config = read_config()
    used = pulled_remotes(args, config)
    lines = unverified_remotes(used, config)
    for line in lines:
        print(f"{LABEL}: {line}", flush=True)
    if lines:
        sys.exit(2)
    remote = not no_remote_configured(config)
    if not remote:
        print(f"{LABEL}: {NO_REMOTE}", flush=True)  # a note, not an error: the pull may still check out
    if pulls:
        # Nothing to download from: no fetch (`-r NAME` fetches, and DVC says if NAME does not exist).
        if remote and not used:
            print(f"{LABEL}: {NO_DEFAULT}", flush=True)
        sys.exit(pull(args, fetch=bool(used)))


if __name__ == "__main__":
    run_main(LABEL, main)
