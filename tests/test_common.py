"""stages.common's writers (a stage's several outputs all written, or none) and its YAML loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.common import PipelineError, exception_line, parse_yaml, write_files_atomic


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


def test_parse_yaml_reads_as_safe_load_does_but_refuses_duplicate_keys():
    """One loader for params.yaml, presets.yaml and datasets.yaml: safe_load's values, merge keys
    allowed, a repeated key (at any depth) refused in one line that says where."""
    text = "base: &b {lr: 0.1, n: 2}\nrun:\n  <<: *b\n  lr: 1.0e-3\nseed: 1e-3\n"
    assert parse_yaml(text, "x.yaml") == yaml.safe_load(text)
    with pytest.raises(PipelineError, match=r"^x\.yaml: not valid YAML: found duplicate key 'lr' \(line 3, column 3\)$"):
        parse_yaml("train:\n  lr: 0.2\n  lr: 0.05\n", "x.yaml")
    with pytest.raises(PipelineError, match=r"^x\.yaml: not valid YAML: expected .* \(line 2, column 1\)$"):
        parse_yaml("train: [unclosed\n", "x.yaml")
    with pytest.raises(PipelineError, match=r"^x\.yaml: not valid YAML: month must be in 1\.\.12"):
        parse_yaml("date: 2026-13-01\n", "x.yaml")  # a constructor's ValueError, not a traceback


def test_exception_line_is_the_type_and_the_first_line_of_the_message():
    assert exception_line(RuntimeError("size mismatch for fc.weight\n  copying a param ...")) == \
        "RuntimeError: size mismatch for fc.weight"
    assert exception_line(OSError("  \n")) == "OSError"  # no message: the type alone
    assert exception_line(KeyError("fc.bias")) == "KeyError: 'fc.bias'"
