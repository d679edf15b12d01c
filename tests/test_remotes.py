"""stages.remotes, `make pull`'s check, on DVC config files written here (no remote is reached).
tests/test_sharing.py runs `make pull` itself against a real remote."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from stages.common import PipelineError
from stages.remotes import NO_REMOTE, USAGE, main, parsed_pull_args, pulled_remotes, read_config, unverified_remotes


def unverified(pull_args: list[str] | None = None) -> list[str]:
    """The check's lines for `dvc pull PULL_ARGS` in the working directory; none for help."""
    args = parsed_pull_args(pull_args or [])
    if args is None:
        return []
    config = read_config()
    return unverified_remotes(pulled_remotes(args, config), config)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty DVC project in a git repository as the working directory, with global and system
    config of its own."""
    for level in ("GLOBAL", "SYSTEM"):
        monkeypatch.setenv(f"DVC_{level}_CONFIG_DIR", str(tmp_path / level.lower()))
        (tmp_path / level.lower()).mkdir()
    (tmp_path / "project" / ".dvc").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(tmp_path / "project")], check=True)
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path


def test_every_remote_without_verify_is_named_with_its_fix(project):
    (project / "project/.dvc/config").write_text(
        "['remote \"storage\"']\n    url = /tmp/storage\n    verify = True\n"  # as `dvc remote modify` may write it
        "['remote \"nas.backup\"']\n    url = /mnt/nas\n"  # a dot in the name
        "['remote \"team s3\"']\n    url = s3://bucket/dvc\n    verify = false\n")
    assert unverified(["--all-commits"]) == [
        "remote 'nas.backup' has verify off (unset: DVC's default), so a corrupt download would go unnoticed; "
        "turn it on for everyone: dvc remote modify nas.backup verify true && git commit .dvc/config",
        "remote 'team s3' has verify off (false in .dvc/config), so a corrupt download would go unnoticed; "
        "turn it on for everyone: dvc remote modify 'team s3' verify true && git commit .dvc/config"]


def test_the_fix_goes_where_verify_is_off(project):
    """A teammate's .dvc/config.local that says false wins over the committed true; a remote kept
    in the user's global config is fixed there (committing it would break every other clone)."""
    (project / "project/.dvc/config").write_text("['remote \"storage\"']\n    url = /tmp/storage\n    verify = true\n")
    (project / "project/.dvc/config.local").write_text("['remote \"storage\"']\n    verify = false\n")
    (project / "global/config").write_text("['remote \"backup\"']\n    url = /mnt/backup\n")
    global_file = project / "global/config"
    assert unverified(["-a"]) == [
        "remote 'backup' has verify off (unset: DVC's default), so a corrupt download would go unnoticed; "
        f"turn it on in {global_file}: dvc remote modify --global backup verify true",
        "remote 'storage' has verify off (false in .dvc/config.local), so a corrupt download would go "
        "unnoticed; turn it on in .dvc/config.local: dvc remote modify --local storage verify true"]
    (project / "project/.dvc/config.local").write_text("")
    (project / "global/config").write_text("['remote \"backup\"']\n    url = /mnt/backup\n    verify = true\n")
    assert unverified(["-a"]) == []


def test_only_the_remotes_the_pull_downloads_from_are_checked(project):
    """As DVC chooses them: the one -r names; else the default and those an output pins; with
    -a, -T or -A every remote (other commits may pin others)."""
    (project / "project/.dvc/config").write_text(
        "[core]\n    remote = storage\n"
        "['remote \"storage\"']\n    url = /tmp/storage\n    verify = true\n"
        "['remote \"backup\"']\n    url = /mnt/backup\n"
        "['remote \"pinned\"']\n    url = /mnt/pinned\n")
    (project / "project/dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: python train.py\n    outs:\n      - model.pt:\n          remote: pinned\n")
    named = {name: f"remote '{name}' has verify off" for name in ("backup", "pinned")}

    def checked(*pull_args):
        return [name for name, start in named.items() for line in unverified(list(pull_args))
                if line.startswith(start)]

    assert checked() == ["pinned"]
    assert checked("-r", "storage") == [] and checked("--remote=backup") == ["backup"]
    assert checked("-fr", "backup", "model.pt") == ["backup"]  # DVC's own option parsing
    assert checked("-r", "nowhere") == []  # no such remote: `dvc pull` says so itself
    assert checked("-T") == ["backup", "pinned"]
    (project / "project/dvc.yaml").write_text("stages:\n  train:\n    cmd: python train.py\n    outs: [model.pt]\n")
    assert checked() == []


def test_an_option_dvc_pull_does_not_take_is_refused_by_dvc(project, capsys, caplog):
    with pytest.raises(SystemExit) as refused:
        unverified(["--bogus"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --bogus" in caplog.text
    assert unverified(["-h"]) == [], "help checks nothing: `dvc pull -h` prints it"
    assert capsys.readouterr().out == "", "DVC's usage text is left to `dvc pull` (it printed twice)"


def test_a_config_dvc_cannot_read_is_one_line(project):
    (project / "project/.dvc/config").write_text("['remote \"storage\"']\n    verify = true\n")  # no url
    with pytest.raises(PipelineError, match=r"^DVC's config: .*expected 'url'"):
        unverified()


def test_a_pull_with_no_remote_configured_says_how_to_get_one(project, capsys, monkeypatch):
    """A fresh clone: `dvc pull` alone warns there is no remote, says "Everything is up to date" and
    then fails to check out, asking whether the cache is up to date."""
    monkeypatch.setattr("sys.argv", ["stages.remotes"])
    main()
    assert capsys.readouterr().out == f"make pull: {NO_REMOTE}\n"
    assert "dvc remote add -d NAME URL" in NO_REMOTE and "make repro" in NO_REMOTE
    for asks_help in (["-h"], ["--he"], ["-fh"]):  # as DVC's parser reads them
        monkeypatch.setattr("sys.argv", ["stages.remotes", *asks_help])
        main()  # help checks nothing, and says what the check is (it printed nothing at all)
        assert capsys.readouterr().out == USAGE + "\n", asks_help
    assert USAGE.startswith("usage: python -m stages.remotes [--pull] [dvc pull options]") and "verify = true" in USAGE
    (project / "project/.dvc/config").write_text("[core]\n    remote = storage\n")  # defined nowhere
    monkeypatch.setattr("sys.argv", ["stages.remotes"])
    main()
    assert capsys.readouterr().out == "", "`dvc pull` names the missing remote itself"
    (project / "project/.dvc/config").write_text("")
    (project / "global/config").write_text("['remote \"team\"']\n    url = /tmp/team\n    verify = true\n")
    monkeypatch.setattr("sys.argv", ["stages.remotes"])
    main()
    assert capsys.readouterr().out == "", "a remote at any level: nothing to say"


def test_make_pull_parses_the_options_and_reads_the_config_once(project, capsys, monkeypatch):
    """The remotes checked and the no-remote note come from one reading of each: the same
    options, the same config (opening the pipeline, DVC reads its config again itself)."""
    import dvc.cli
    import dvc.config

    calls = {"parse_args": 0, "from_cwd": 0}
    real_parse_args, real_from_cwd = dvc.cli.parse_args, dvc.config.Config.from_cwd

    def parse_args(*args, **kwargs):
        calls["parse_args"] += 1
        return real_parse_args(*args, **kwargs)

    def from_cwd(*args, **kwargs):
        calls["from_cwd"] += 1
        return real_from_cwd(*args, **kwargs)

    monkeypatch.setattr(dvc.cli, "parse_args", parse_args)
    monkeypatch.setattr(dvc.config.Config, "from_cwd", staticmethod(from_cwd))
    monkeypatch.setattr("sys.argv", ["stages.remotes", "-j", "2"])
    main()
    assert capsys.readouterr().out == f"make pull: {NO_REMOTE}\n"
    assert calls == {"parse_args": 1, "from_cwd": 1}


def test_options_are_read_before_the_config(project, capsys, caplog, monkeypatch):
    """As `dvc pull` does: help prints whatever the config holds, and an option it does not take
    is refused before the config is read."""
    (project / "project/.dvc/config").write_text("['remote \"storage\"']\n    verify = true\n")  # no url
    monkeypatch.setattr("sys.argv", ["stages.remotes", "-h"])
    main()
    assert capsys.readouterr().out == USAGE + "\n", "help: before the config is read"
    monkeypatch.setattr("sys.argv", ["stages.remotes", "--bogus"])
    with pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 2 and "unrecognized arguments: --bogus" in caplog.text
    monkeypatch.setattr("sys.argv", ["stages.remotes"])
    with pytest.raises(PipelineError, match=r"^DVC's config: .*expected 'url'"):
        main()


@pytest.mark.parametrize("pull_args", [
    [], ["-j", "3", "-r", "storage", "-a", "-T", "-A", "-d", "-R", "--run-cache", "-q", "models/model.pt"],
    ["-fv", "--allow-missing", "--no-run-cache", "data/raw", "train"],
    ["--glob", "plots/*.png"],
])
def test_make_pull_splits_the_options_between_fetch_and_checkout_as_dvc_pull_does(project, pull_args):
    """make pull runs `dvc pull` as `dvc fetch` and `dvc checkout`: each gets, as DVC's own parser
    reads them, every option of the pull it takes (pull passes them on the same way)."""
    from dvc.cli import parse_args

    from stages.remotes import CHECKOUT_FLAGS, FETCH_FLAGS, FETCH_VALUES, half_argv

    for name in ("a.png", "b.png"):
        (project / "project/plots").mkdir(exist_ok=True)
        (project / "project/plots" / name).touch()
    pulled = parsed_pull_args(pull_args)
    fetch = parse_args(half_argv(pulled, "fetch", FETCH_FLAGS, FETCH_VALUES))
    checkout = parse_args(half_argv(pulled, "checkout", CHECKOUT_FLAGS, {}))
    expanded = ["plots/a.png", "plots/b.png"] if pulled.glob else pulled.targets
    for name in ("jobs", "remote", "all_branches", "all_tags", "all_commits", "with_deps", "recursive", "run_cache",
                 "quiet", "verbose"):
        assert getattr(fetch, name) == getattr(pulled, name), name
    for name in ("with_deps", "recursive", "force", "allow_missing", "quiet", "verbose"):
        assert getattr(checkout, name) == getattr(pulled, name), name
    assert fetch.targets == checkout.targets == expanded
    # Every option of the pull is passed on or accounted for: a DVC release that adds one fails here.
    handled = {*FETCH_FLAGS, *FETCH_VALUES, *CHECKOUT_FLAGS, "run_cache", "targets", "glob", "quiet", "verbose"}
    global_options = set(vars(parse_args(["status"])))  # --cd, --wait-for-lock, ... (before the command)
    assert set(vars(pulled)) - global_options - {"func", "parser"} <= handled


def test_a_manifest_is_damaged_when_its_bytes_do_not_hash_to_its_name(tmp_path):
    from stages.remotes import damaged_manifests

    listing = b'[{"md5": "2646ac647ad5339dbf082846283269ea", "relpath": "t10k-images-idx3-ubyte"}]'
    md5 = hashlib.md5(listing).hexdigest()
    (tmp_path / md5[:2]).mkdir()
    (tmp_path / md5[:2] / f"{md5[2:]}.dir").write_bytes(listing)
    (tmp_path / md5[:2] / md5[2:]).write_bytes(b"a file object: not a manifest, never listed")
    renamed = listing.replace(b"ubyte", b"ubytX")
    bad = hashlib.md5(listing + b" ").hexdigest()  # a name that is not its bytes' md5
    (tmp_path / bad[:2]).mkdir(exist_ok=True)
    (tmp_path / bad[:2] / f"{bad[2:]}.dir").write_bytes(renamed)
    assert damaged_manifests(tmp_path) == [tmp_path / bad[:2] / f"{bad[2:]}.dir"]


def test_the_checkout_leaves_out_only_the_outputs_with_a_damaged_manifest():
    """A pull target none of whose outputs has a problem stays as given (one file inside a
    directory output is not widened to the directory); the others become their sound outputs."""
    from stages.remotes import sound_targets

    problems = {"data/raw": "its manifest ... did not arrive intact"}
    assert sound_targets({"": {"data/raw", "models/model.pt", "metrics/train"}}, problems) == [
        "metrics/train", "models/model.pt"]
    assert sound_targets({"metrics/train/metrics.json": {"metrics/train"}, "fetch": {"data/raw"},
                          "train": {"models/model.pt", "metrics/train"}}, problems) == [
        "metrics/train/metrics.json", "train"]
    assert sound_targets({"fetch": {"data/raw", "data/params-valid.txt"}}, problems) == ["data/params-valid.txt"]
    assert sound_targets({"": {"data/raw"}}, problems) == []


def test_outputs_that_share_a_manifest_share_its_problem(project):
    """Two directory outputs with the same files have one manifest: when it did not arrive, both
    are left out (one was once checked out from the damaged listing). Without a download, only a
    manifest found damaged in the cache (and removed) is a problem: a missing one is left to
    `dvc checkout` to report."""
    from stages.remotes import manifest_problems, pull_outputs, remove_damaged_manifests

    root = project / "project"
    (root / "dvc.yaml").write_text(
        "stages:\n"
        "  one:\n    cmd: mkdir -p a && echo x > a/f\n    outs: [a]\n"
        "  two:\n    cmd: mkdir -p b && echo x > b/f\n    outs: [b]\n")
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=root, check=True)
    cache = root / ".dvc/cache/files/md5"
    [manifest] = cache.glob("??/*.dir")
    md5 = manifest.parent.name + manifest.name
    args = parsed_pull_args([])
    cache, outs = pull_outputs(args)
    assert cache == root / ".dvc/cache/files/md5" and {str(out) for out in outs[""]} == {"a", "b"}
    manifest.write_bytes(manifest.read_bytes().replace(b'"f"', b'"g"'))  # renamed in the listing
    assert remove_damaged_manifests(cache) == {md5} and not manifest.exists()
    problems = manifest_problems(outs, cache, fetched=True, removed=set())
    assert sorted(problems) == ["a", "b"] and "did not arrive intact" in problems["a"]
    problems = manifest_problems(outs, cache, fetched=False, removed={md5})
    assert sorted(problems) == ["a", "b"] and "was damaged in the cache" in problems["b"]
    assert manifest_problems(outs, cache, fetched=False, removed=set()) == {}
