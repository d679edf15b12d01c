"""stages.remotes, `make pull`'s check, on DVC config files written here (no remote is reached).
tests/test_sharing.py runs `make pull` itself against a real remote."""

from __future__ import annotations

import pytest

from stages.common import PipelineError
from stages.remotes import unverified


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty DVC project as the working directory, with global and system config of its own."""
    for level in ("GLOBAL", "SYSTEM"):
        monkeypatch.setenv(f"DVC_{level}_CONFIG_DIR", str(tmp_path / level.lower()))
        (tmp_path / level.lower()).mkdir()
    (tmp_path / "project" / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path


def test_every_remote_without_verify_is_named_with_its_fix(project):
    (project / "project/.dvc/config").write_text(
        "['remote \"storage\"']\n    url = /tmp/storage\n    verify = True\n"  # as `dvc remote modify` may write it
        "['remote \"nas.backup\"']\n    url = /mnt/nas\n"  # a dot in the name
        "['remote \"team s3\"']\n    url = s3://bucket/dvc\n    verify = false\n")
    assert unverified() == [
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
    assert unverified() == [
        "remote 'backup' has verify off (unset: DVC's default), so a corrupt download would go unnoticed; "
        f"turn it on in {global_file}: dvc remote modify --global backup verify true",
        "remote 'storage' has verify off (false in .dvc/config.local), so a corrupt download would go "
        "unnoticed; turn it on in .dvc/config.local: dvc remote modify --local storage verify true"]
    (project / "project/.dvc/config.local").write_text("")
    (project / "global/config").write_text("['remote \"backup\"']\n    url = /mnt/backup\n    verify = true\n")
    assert unverified() == []


def test_a_config_dvc_cannot_read_is_one_line(project):
    (project / "project/.dvc/config").write_text("['remote \"storage\"']\n    verify = true\n")  # no url
    with pytest.raises(PipelineError, match=r"^DVC's config: .*expected 'url'"):
        unverified()
