"""benchmarks/speed.py (`make bench`) and benchmarks/predict_check.py run end to end on tiny
synthetic MNIST, so that neither script rots between the runs that give their figures; and the
command-line helpers every benchmark shares (benchmarks/presets.py).

Not timing tests: the numbers they print are not checked, only that every part ran and reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
import torchvision  # noqa: F401 (the tutorials' input pipeline: the test extra carries it, never skipped)

from benchmarks import predict_check, speed
from benchmarks import presets as bench_presets
from benchmarks.presets import append_text, comma_ints, output_file, params_line, positive_int
from benchmarks.frontier import quick_data
from stages.common import PipelineError, save_tensors
from stages.models import network_count
from stages.params import parse
from tests.conftest import PROJECT_ROOT
from tests.test_predict_formats import FORMATS


def test_make_bench_measures_every_input_pipeline_the_fast_preset_and_memory(tmp_path, capsys, monkeypatch):
    # The tiny IDX files stand in for MNIST's, whose checksums they cannot have (the next test).
    monkeypatch.setattr(speed, "check_raw", lambda raw_dir, dataset: None)
    raw, splits = quick_data(tmp_path)
    for name, split in splits.items():
        save_tensors(tmp_path / "prepared" / f"{name}.pt", split)
    reads = []  # the prepared splits are read once, by main, for the checks and both parts
    monkeypatch.setattr(speed, "load_splits", lambda folder, real=speed.load_splits: reads.append(folder) or real(folder))
    monkeypatch.setattr(speed, "load_tensors", lambda *args, **kwargs: reads.append(args) or pytest.fail("read again"))
    speed.main(["--raw", str(raw), "--data", str(tmp_path / "prepared"), "--repeats", "2", "--device", "cpu"])
    assert reads == [tmp_path / "prepared"]
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "torch threads" in out
    assert "on the 1,200 official training images (fastest of 2)" in out  # the mirror's whole train set
    for part in ("(a) tutorials", "(b) this project", "(c) (b)'s model"):
        assert re.search(re.escape(part) + r".*:\s+\d+\.\d\d s", out), part
    assert re.search(r"speed-up \(a\)/\(b\): \d+\.\dx; no input pipeline can exceed \(a\)/\(c\) = \d+\.\dx", out)
    assert re.search(r"2\. Preset 'fast': cnn \[16, 32, 48\], 1 epoch\(s\)", out)
    assert re.search(r"trained in \d+\.\d s; test accuracy \d+\.\d\d% on 200 images", out)
    assert re.search(r"3\. Peak resident memory of this process: \d+ MiB", out)


def test_make_bench_refuses_images_that_are_not_mnists_before_timing_anything(tmp_path, capsys):
    """Part 1 times MNIST's official training set: files under its names with other bytes (data/raw
    after a `fashion` repro; here the tiny synthetic ones) are refused by checksum, before any epoch."""
    raw, splits = quick_data(tmp_path)
    for name, split in splits.items():
        save_tensors(tmp_path / "prepared" / f"{name}.pt", split)
    with pytest.raises(PipelineError, match=r"train-images-idx3-ubyte.*: .*The benchmark's dataset is mnist"):
        speed.main(["--raw", str(raw), "--data", str(tmp_path / "prepared"), "--repeats", "1", "--device", "cpu"])
    assert "(a) tutorials" not in capsys.readouterr().out


@pytest.mark.parametrize("skip_fast", [False, True])
def test_make_bench_refuses_prepared_splits_of_another_dataset(tmp_path, capsys, monkeypatch, skip_fast):
    """data/prepared after a `fashion` repro holds garments: part 2 would time `fast` on them, and
    part 1 takes the train split's mean and std, so they are refused by class name even with --skip-fast."""
    monkeypatch.setattr(speed, "check_raw", lambda raw_dir, dataset: None)  # tiny files, not MNIST's
    raw, splits = quick_data(tmp_path)
    for name, split in splits.items():
        save_tensors(tmp_path / "prepared" / f"{name}.pt", {**split, "classes": ["T-shirt/top", *split["classes"][1:]]}
                     if name == "train" else split)
    argv = ["--raw", str(raw), "--data", str(tmp_path / "prepared"), "--repeats", "1", "--device", "cpu"]
    with pytest.raises(PipelineError, match=r"prepared holds another dataset than MNIST \(class names \['T-shirt"):
        speed.main([*argv, *(["--skip-fast"] if skip_fast else [])])
    assert "(a) tutorials" not in capsys.readouterr().out


def test_make_bench_times_one_network_of_an_ensemble():
    """The loops make bench compares step a network as the tutorials do (their loss takes [N, C]
    logits): with train.networks > 1 it times one network, not an ensemble's [networks, N, C]."""
    cfg = dataclasses.replace(parse(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())).train, networks=3)
    data = {"images": torch.zeros(4, 28, 28, dtype=torch.uint8), "classes": [str(k) for k in range(10)],
            "mean": 0.13, "std": 0.31}
    model = speed.fresh_model(cfg, data, torch.device("cpu"))
    assert network_count(model) == 1 and model.train()(data["images"]).shape == (4, 10)


def test_make_bench_names_every_missing_idx_file_before_timing_anything(tmp_path, capsys):
    """Only the train files in --raw: the test files are named too, before any timed epoch (they
    were found missing only after part 1's epochs)."""
    raw, splits = quick_data(tmp_path)
    for name, split in splits.items():
        save_tensors(tmp_path / "prepared" / f"{name}.pt", split)
    for test_file in raw.glob("t10k-*"):
        test_file.unlink()
    with pytest.raises(PipelineError, match=r": no t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte \(nor \.gz\)"):
        speed.main(["--raw", str(raw), "--data", str(tmp_path / "prepared"), "--repeats", "1", "--device", "cpu"])
    assert "(a) tutorials" not in capsys.readouterr().out


def test_make_bench_finds_missing_splits_before_timing_anything(tmp_path, capsys, monkeypatch):
    """Part 2's prepared splits are checked before part 1's timed epochs, not minutes after them."""
    monkeypatch.setattr(speed, "check_raw", lambda raw_dir, dataset: None)  # tiny files, not MNIST's
    raw, splits = quick_data(tmp_path)
    for name, split in splits.items():
        if name != "test":
            save_tensors(tmp_path / "prepared" / f"{name}.pt", split)
    with pytest.raises(PipelineError, match=r"prepared/test\.pt: file not found"):
        speed.main(["--raw", str(raw), "--data", str(tmp_path / "prepared"), "--repeats", "1", "--device", "cpu"])
    assert "(a) tutorials" not in capsys.readouterr().out


def test_seeds_and_ranges_read_as_the_numbers_they_name():
    assert comma_ints("0, 1,2") == [0, 1, 2]
    assert comma_ints("60-63,70") == [60, 61, 62, 63, 70] and comma_ints("5-5") == [5]


@pytest.mark.parametrize(("text", "message"), [
    ("1-", "'1-': not a whole number >= 0, nor a range of them such as 60-79"),
    ("-3", "'-3': not a whole number >= 0"),
    ("a", "'a': not a whole number >= 0"),
    ("5-3", "'5-3': a range runs from the lower number to the higher"),
    ("0-99999999999", "'0-99999999999': more than 10,000 numbers"),
    ("0,,1", "'0,,1': an empty item between commas"),
    ("0,1,", "'0,1,': an empty item between commas"),
])
def test_numbers_that_are_not_seeds_are_refused_with_what_is_wrong(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(message)}"):
        comma_ints(text)


@pytest.mark.parametrize("text", ["0", "-2", "1.5", "", "x"])
def test_a_count_below_one_or_not_whole_is_refused_with_the_text_given(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(repr(text))}: not a whole number >= 1$"):
        positive_int(text)
    assert positive_int(" 3 ") == 3


@pytest.mark.parametrize(("module", "option"), [("frontier", "--reference-epochs"), ("speed", "--repeats"),
                                                ("reference", "--epochs"), ("predict_check", "--digits")])
def test_each_benchmark_refuses_a_count_of_zero_before_it_reads_any_data(module, option, capsys):
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as info:
        main([option, "0"])
    assert info.value.code == 2 and f"argument {option}: '0': not a whole number >= 1" in capsys.readouterr().err


def test_an_output_file_the_user_cannot_write_is_refused_when_the_command_is_read(tmp_path, monkeypatch):
    """As root every permission check passes, so the refusal is simulated where the folder is tried:
    one line, before any run (not a traceback after an hour's run)."""
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(bench_presets.tempfile, "TemporaryFile", refused)
    with pytest.raises(argparse.ArgumentTypeError, match=rf"^{tmp_path}/t\.md: cannot write in {tmp_path} "
                                                         r"\(Permission denied\)$"):
        output_file(str(tmp_path / "t.md"))
    # The nearest folder that exists is the one tried, and nothing is made while the command is read.
    with pytest.raises(argparse.ArgumentTypeError, match=rf"^{tmp_path}/new/sub/t\.md: cannot write in {tmp_path} "):
        output_file(str(tmp_path / "new" / "sub" / "t.md"))
    assert not (tmp_path / "new").exists()


def test_an_output_files_folders_are_made_by_its_first_write_not_when_the_command_is_read(tmp_path):
    """A refused run (an unknown preset after --plot new/x.png) left new folders behind; a path
    that names a folder (a trailing slash) was made a file."""
    target = tmp_path / "new" / "sub" / "t.md"
    assert output_file(str(target)) == target and not (tmp_path / "new").exists()
    append_text(target, "| row |\n")
    assert target.read_text() == "| row |\n"
    for folder in (f"{tmp_path}/other/", str(tmp_path)):
        with pytest.raises(argparse.ArgumentTypeError, match="is a folder; name a file"):
            output_file(folder)
    assert not (tmp_path / "other").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match=rf"afile/t\.md: cannot write \(Not a directory: {tmp_path}/afile\)$"):
        output_file(str(tmp_path / "afile" / "t.md"))
    # The folders the write reaches are the ones made: `..` resolved, a link followed to its target.
    append_text(output_file(str(tmp_path / "gone" / ".." / "u.md")), "| row |\n")
    assert (tmp_path / "u.md").read_text() == "| row |\n" and not (tmp_path / "gone").exists()
    (tmp_path / "link.md").symlink_to(tmp_path / "far" / "away" / "v.md")  # dangling until the first write
    append_text(output_file(str(tmp_path / "link.md")), "| row |\n")
    assert (tmp_path / "far" / "away" / "v.md").read_text() == "| row |\n"


def test_an_existing_file_is_appended_to_even_in_a_folder_that_takes_no_new_files(tmp_path, monkeypatch):
    """A table or sealed-test file that exists is only appended to: its folder need not take new
    files (/dev/stdout, a file in a read-only folder). A figure is renamed into place: it must."""
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(bench_presets.tempfile, "TemporaryFile", refused)
    (tmp_path / "t.md").write_text("kept\n")
    assert output_file(str(tmp_path / "t.md")) == tmp_path / "t.md"
    assert (tmp_path / "t.md").read_text() == "kept\n"
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write"):
        bench_presets.figure_file(str(tmp_path / "t.md"))


def test_appending_to_an_output_file_that_fails_is_one_line(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(PipelineError, match=rf"^{target}/t\.md: cannot write \(Not a directory"):
        append_text(target / "t.md", "| row |\n")


def test_params_line_says_whether_the_params_are_the_committed_ones(tmp_path, monkeypatch):
    """The benchmarks' header: 'default' is params.yaml as committed, or it names the keys that
    differ (what `dvc exp run -S` leaves in the workspace)."""
    monkeypatch.chdir(tmp_path)
    assert params_line(params_path=Path("params.yaml")) == "params: params.yaml (no commit to compare it with)"
    (tmp_path / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "params"], check=True)
    assert params_line(params_path=Path("params.yaml")) == "params: params.yaml as committed"
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("  lr: 0.2\n", "  lr: 0.3\n", 1)
                                          .replace("  seed: 0\n\ntrain:", "  seed: 5\n\ntrain:", 1))
    assert params_line(params_path=Path("params.yaml")) == (
        "params: params.yaml differs from the last commit in augment.seed, train.lr: every run below starts "
        "from this working copy's params, not the committed ones")
    # A key every run sets (the seeds from --seeds) is not what the runs inherit.
    assert params_line({"augment.seed"}, Path("params.yaml")).startswith(
        "params: params.yaml differs from the last commit in train.lr: ")


def test_predict_check_gives_no_memory_figure_for_work_predict_refused(tmp_path, capsys):
    """The measuring process ran predict with its exit swallowed: a file refused still gave a
    "peak while classifying" figure. And --digits must be a count (-195 sliced off the last 195)."""
    from stages.model_config import ModelConfig
    from stages.models import build_model, save_model

    cfg = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(), convs_per_block=1, pool="end",
                      image_size=28, num_classes=10, mean=0.13, std=0.31)
    save_model(tmp_path / "m.pt", build_model(cfg), cfg, [str(k) for k in range(10)])
    with pytest.raises(PipelineError, match=r"^predict failed on .*none\.png, so no memory figure: .*none\.png"):
        predict_check.peak_rss_mib(tmp_path / "m.pt", [tmp_path / "none.png"])
    for digits in ("-195", "0", "x"):
        with pytest.raises(SystemExit):
            predict_check.main(["--quick", "--digits", digits])
        assert "--digits: " in capsys.readouterr().err
    # --save-model with --model: nothing is trained to keep (it was silently ignored)
    with pytest.raises(SystemExit):
        predict_check.main(["--quick", "--model", str(tmp_path / "m.pt"), "--save-model", str(tmp_path / "k.pt")])
    assert "--save-model keeps the model this check trains; with --model nothing is trained" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "digits"), [(["--quick"], 5), (["--quick", "--digits", "7"], 7), ([], 100)])
def test_predict_check_saves_few_digits_for_its_smoke_test(monkeypatch, args, digits):
    """--quick promises seconds: at the real check's 100 digits per format it took 2 minutes."""
    class Stop(Exception):
        pass

    def stop_at_formats(model_path, raw_dir, asked, work, dataset):
        raise Stop(asked)

    monkeypatch.setenv("MNIST_MIRROR", "unused")
    monkeypatch.setattr(predict_check, "train_fast_model", lambda *args: None)
    monkeypatch.setattr(predict_check, "format_accuracy", stop_at_formats)
    with pytest.raises(Stop) as stopped:  # (it sets one thread: conftest's torch_process_state puts them back)
        predict_check.main(args)
    assert stopped.value.args == (digits,)


def test_predict_check_classifies_every_format_and_measures_memory(capsys):
    predict_check.main(["--quick", "--digits", "3"])  # on one thread: conftest's torch_process_state puts them back
    out = capsys.readouterr().out
    assert "--quick: a smoke test" in out  # its numbers are not to be read as the real check's
    rows = dict(re.findall(r"^\| ([^|]+?) \| (\d+) \|$", out, flags=re.MULTILINE))
    assert list(rows) == ["raw 28x28 (IDX, no conversion)", *FORMATS]
    assert all(0 <= int(right) <= 3 for right in rows.values())
    memory = re.search(r"^\| one 28x28 PNG \(the floor: [^|]+\| (\d+) \| (\d+) \| (-?\d+) \|$", out, flags=re.MULTILINE)
    assert memory, out
    start, peak, added = map(int, memory.groups())
    assert 0 < start <= peak and abs(added - (peak - start)) <= 1  # each column rounded on its own


def test_predict_check_of_another_dataset_needs_a_model_of_its_classes(tmp_path, monkeypatch):
    """--dataset fashion-mnist: only MNIST's fast preset is trained by the script, and a digit
    model's table of garments would count nothing right without saying why."""
    from stages.model_config import ModelConfig
    from stages.models import build_model, save_model

    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    with pytest.raises(PipelineError, match="--dataset fashion-mnist needs a model of it"):
        predict_check.main(["--dataset", "fashion-mnist"])
    cfg = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(), convs_per_block=1, pool="end",
                      image_size=28, num_classes=10, mean=0.13, std=0.31)
    save_model(tmp_path / "digits.pt", build_model(cfg), cfg, [str(k) for k in range(10)])
    with pytest.raises(PipelineError, match=r"digits.pt: a model of the classes 0, 1, .*, not fashion-mnist's"):
        predict_check.format_accuracy(tmp_path / "digits.pt", tmp_path, 3, tmp_path / "formats", "fashion-mnist")
