"""stages.common's writers: a stage's several outputs all written, or none."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.common import write_files_atomic


def test_ctrl_c_while_writing_leaves_every_target_as_it_was(tmp_path, monkeypatch):
    targets = {tmp_path / name: f"new {name}".encode() for name in ("a.pt", "b.pt", "c.pt")}
    for target in targets:
        target.write_bytes(b"old")
    real_write_bytes, writes = Path.write_bytes, []

    def interrupted_at_the_second(path, data):
        writes.append(path.name)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return real_write_bytes(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", interrupted_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            write_files_atomic(targets)
    assert writes[0].startswith(".tmp-a.pt."), "the first file was written, to a temporary"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.pt", "b.pt", "c.pt"], "no temporary is left"
    assert all(target.read_bytes() == b"old" for target in targets)

    write_files_atomic(targets)
    assert {target: target.read_bytes() for target in targets} == targets
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.pt", "b.pt", "c.pt"]


def test_a_target_named_like_anothers_temporary_is_spared(tmp_path):
    """model.pt's clean-up of temporaries a SIGKILL left behind must not remove the live temporary
    of model.pt.sha256, written in the same call; a real leftover of model.pt's goes."""
    (tmp_path / ".tmp-model.pt.k1ll3d00").write_bytes(b"left by a SIGKILL")
    targets = {tmp_path / "model.pt.sha256": b"digest", tmp_path / "model.pt": b"weights"}
    write_files_atomic(targets)
    assert {target: target.read_bytes() for target in targets} == targets
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.pt", "model.pt.sha256"]
