"""benchmarks/batchnorm.py, the measurement behind the fast preset's widths, kept runnable."""

import pytest
import torch

from benchmarks import batchnorm


def test_prints_each_layouts_times_in_their_columns_per_side_and_channel_count(monkeypatch, capsys):
    calls = []

    def fake(shape, dtype, channels_last, iterations, repeats):
        calls.append((shape, dtype, channels_last, iterations, repeats))
        return (3.0, 4.0) if channels_last else (1.0, 2.0)  # distinct per layout: the columns' order shows
    monkeypatch.setattr(batchnorm, "time_batchnorm", fake)
    batchnorm.main(["--channels", "8,16", "--sizes", "4", "--batch", "5", "--dtype", "fp32",
                    "--iterations", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "torch ISA" in out and "fp32, batch 5" in out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| 4 |")]
    assert rows == [["4", "8", "1", "2", "3", "4"], ["4", "16", "1", "2", "3", "4"]]
    assert calls == [((5, c, 4, 4), torch.float32, last, 2, 1) for c in (8, 16) for last in (False, True)]


def test_a_real_run_prints_four_times_a_row(capsys):
    batchnorm.main(["--channels", "8", "--sizes", "3", "--batch", "2", "--iterations", "1", "--repeats", "1"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 |"))
    assert len([float(cell) for cell in row.split("|")[3:-1]]) == 4  # numbers, not blanks or errors


@pytest.mark.parametrize("channels_last", [False, True])
def test_each_layout_reaches_batch_norm_as_asked(monkeypatch, channels_last):
    seen = []
    real = batchnorm.F.batch_norm
    monkeypatch.setattr(batchnorm.F, "batch_norm", lambda images, *rest, **kw: seen.append(
        (images.dtype, images.is_contiguous(memory_format=torch.channels_last), images.is_contiguous()))
        or real(images, *rest, **kw))
    batchnorm.time_batchnorm((2, 3, 4, 4), torch.bfloat16, channels_last, 2, 1)
    assert seen and set(seen) == {(torch.bfloat16, channels_last, not channels_last)}


@pytest.mark.parametrize("args", [["--iterations", "0"], ["--repeats", "0"], ["--batch", "-1"], ["--channels", "0"],
                                  ["--sizes", ""]], ids=["iterations", "repeats", "batch", "channels", "sizes"])
def test_a_count_below_one_is_an_argument_error_not_a_traceback(args, capsys):
    """Before: ZeroDivisionError, an empty table, `index 0 out of range` or a negative dimension."""
    with pytest.raises(SystemExit) as info:
        batchnorm.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {args[0]}" in err or f"error: argument {args[0]}: {args[1]!r}: not a whole number >= 1" in err
