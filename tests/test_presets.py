"""presets.yaml: every preset, applied to the committed params.yaml, is a valid set of params."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks import presets as bench
from stages.common import PipelineError
from stages.params import parse
from stages.presets import apply, check, leftover_keys, load_presets, main, resolve, set_param_keys
from tests.conftest import PROJECT_ROOT
from tests.synthetic import write_prepared

PRESETS = load_presets(PROJECT_ROOT / "presets.yaml")
RAW = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_against_params_yaml(name):
    params = parse(apply(RAW, resolve(name, PRESETS)))
    for dotted, value in PRESETS[name].items():
        section, key = dotted.split(".", 1)
        assert getattr(getattr(params, section), key) == value, dotted


def test_unknown_key_in_a_preset_is_refused():
    with pytest.raises(PipelineError, match="'train.nope' is not a key of params.yaml"):
        apply(RAW, {"train.nope": 1})


@pytest.mark.parametrize("section", [None, 3, ["a"]])
def test_a_params_section_that_is_not_a_mapping_is_refused_in_one_line(section):
    """`train:` left empty (None), or a value where the section's keys should be: a one-line
    error naming the key and the section, not a TypeError from `in`."""
    with pytest.raises(PipelineError,
                       match=r"^cannot set 'train.epochs': train in params.yaml is not a mapping of keys$"):
        apply({**RAW, "train": section}, {"train.epochs": 1})


@pytest.mark.parametrize(("content", "held"), [("", "nothing"), ("- 1\n", "a list"), ("3\n", "the value 3")])
def test_a_params_file_that_is_not_a_mapping_is_refused_in_one_line(tmp_path, content, held):
    """An empty params file, or one holding a list or a number: one line naming it, with a preset
    or without (was a TypeError from `in` with one, and `'train.channels' is not a key` with a list)."""
    path = tmp_path / "params.yaml"
    path.write_text(content)
    for spec in ("fast", "default"):
        with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))} holds {held}, not a mapping of sections"):
            check(spec, resolve(spec, PRESETS), path)
    with pytest.raises(PipelineError, match=rf"^cannot set 'train.epochs': the params file holds {held}, not a "):
        apply(yaml.safe_load(content), {"train.epochs": 1})


def load_error(path, text: str) -> str:
    """The one-line error load_presets gives for a presets file holding `text`."""
    path.write_text(text)
    with pytest.raises(PipelineError) as info:
        load_presets(path)
    return str(info.value)


def test_a_preset_that_is_no_mapping_is_named(tmp_path):
    """A preset written as a list (`- train.lr: 0.1`), or with a key that is no text, is refused by
    name, not a TypeError or AttributeError later."""
    path = tmp_path / "presets.yaml"
    assert load_error(path, "empty:\nlisted:\n  - train.lr: 0.1\n") == (
        f"{path}: preset 'listed': expected a mapping of params.yaml keys to values (train.lr: 0.1), got list")
    assert load_error(path, "numbered:\n  1: 2\n") == (
        f"{path}: preset 'numbered': key 1 is not a params.yaml key (section.key, as in train.lr)")
    path.write_text("empty:\nset:\n  train.lr: 0.1\n")
    assert load_presets(path) == {"empty": {}, "set": {"train.lr": 0.1}}


def test_default_names_params_yaml_as_it_is_and_no_preset_may_take_that_name(tmp_path, capsys):
    """`default` (what the frontier and screen call params.yaml) works wherever a preset name does,
    alone or in a `+` combination, and presets.yaml cannot give the name another meaning."""
    assert resolve("default", PRESETS) == {}
    assert resolve("default+aug", PRESETS) == PRESETS["aug"]
    assert resolve("fast+default", PRESETS) == PRESETS["fast"]
    with pytest.raises(PipelineError, match=r"unknown preset 'defualt'; presets: .*\(default: params.yaml as it is\)"):
        resolve("defualt", PRESETS)
    params_path = tmp_path / "params.yaml"
    params_path.write_text((PROJECT_ROOT / "params.yaml").read_text().replace("  epochs: ", "  epochs: 0 #", 1))
    with pytest.raises(PipelineError, match=r"^preset 'default' on .*params\.yaml: train\.epochs \(as in "):
        check("default", {}, params_path)  # the file's own error: presets.yaml not named
    main([])
    assert capsys.readouterr().out.splitlines() == ["default", *PRESETS]  # each one a valid argument
    path = tmp_path / "presets.yaml"
    assert load_error(path, "default:\n  train.lr: 0.1\n") == (
        f"{path}: a preset may not be named 'default': that name stands for params.yaml as it is, with no overrides")


def test_a_preset_that_breaks_a_rule_is_named_with_the_key(tmp_path):
    """An invalid value from a preset is reported against the preset and the key, not as an
    error in params.yaml; a bad value of the file itself says so."""
    params_path = tmp_path / "params.yaml"
    params_path.write_text((PROJECT_ROOT / "params.yaml").read_text())
    with pytest.raises(PipelineError, match=r"^preset 'fast\+x' \(presets\.yaml\) on .*params\.yaml: "
                                            r"train\.lr \(overridden\): must be > 0 and at most 10, got -1\.0$"):
        check("fast+x", {**PRESETS["fast"], "train.lr": -1.0}, params_path)
    with pytest.raises(PipelineError, match=r"train\.channels\[0\] \(overridden\): must be an integer"):
        check("x", {"train.channels": ["x", 64, 128]}, params_path)  # an item of a list the preset sets
    params_path.write_text((PROJECT_ROOT / "params.yaml").read_text().replace("  epochs: ", "  epochs: 0 #", 1))
    with pytest.raises(PipelineError, match=r"train\.epochs \(as in .*params\.yaml\): must be between 1 and 1000"):
        check("cnn-max+mlp-best", {"train.lr": 0.1}, params_path)


def test_a_preset_run_refuses_to_inherit_the_last_experiments_params(tmp_path, monkeypatch, capsys):
    """`make exp PRESET=fashion` right after `make exp PRESET=fast`: dvc exp run left fast's params in
    params.yaml, and fashion's options on top would train fast's stem, lr and batch under fashion's
    name. Refused before the params are validated (fashion over mlp-best's would fail that check
    for another reason), naming the keys; the same preset again (EXP_ARGS=-f), keys that EXP_ARGS's
    -S set, and the committed params pass. Through main(), as make exp calls it."""
    for name in ("params.yaml", "presets.yaml"):
        (tmp_path / name).write_text((PROJECT_ROOT / name).read_text())
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "params"], check=True)

    def after(preset, *sets):  # params.yaml as `dvc exp run -S ...` leaves it (the real rewrite is in block style)
        raw = apply(yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text()), resolve(preset, PRESETS))
        Path("params.yaml").write_text(yaml.safe_dump(apply(raw, dict(sets)), sort_keys=False))

    main(["--from-commit", "fashion"])  # the committed params: no complaint
    assert capsys.readouterr().out.startswith("-Sfetch.dataset=fashion-mnist ")
    after("fast")
    main(["--from-commit", "fast", "--", "-f"])  # fast again, over its own params
    with pytest.raises(PipelineError) as info:
        main(["--from-commit", "fashion"])
    leftover = "train.stem, train.lr, train.label_smoothing, train.batch_size"  # fast's, in params.yaml's order
    assert str(info.value).startswith(f"params.yaml differs from the last commit in {leftover}, which preset "
                                      "'fashion' does not set")
    assert "`git checkout params.yaml`" in str(info.value)
    after("mlp-best")  # on_the_fly with fashion's copies: 4 would fail validation, not say why
    with pytest.raises(PipelineError, match=r"^params.yaml differs from the last commit in augment.on_the_fly, "):
        main(["--from-commit", "fashion"])
    after("fast", ("train.seed", 1))
    with pytest.raises(PipelineError, match=r"in train.seed, which preset 'fast' does not set"):
        main(["--from-commit", "fast"])
    main(["--from-commit", "fast", "--", "-f", "-S", "train.seed=2"])  # the run sets the seed itself
    main(["--from-commit", "fast", "--", "--queue", "-S", "train.seed=range(0,3)"])
    # fashion with -S augment.on_the_fly=true -S augment.copies=0 leaves a workspace that fashion's
    # copies: 4 does not validate on; a run that sets on_the_fly back itself is fashion as committed.
    after("fashion", ("augment.on_the_fly", True), ("augment.copies", 0))
    with pytest.raises(PipelineError, match=r"in augment.on_the_fly, which preset 'fashion' does not set"):
        main(["--from-commit", "fashion", "--", "-f"])
    main(["--from-commit", "fashion", "--", "-f", "-S", "augment.on_the_fly=false"])


def test_the_presets_check_reads_the_commit_of_the_params_files_own_repository(tmp_path, monkeypatch):
    """--params in another directory than the working one (which holds presets.yaml and is no git
    repository) is compared with its own repository's last commit; where git itself is missing
    there is nothing to compare, not a traceback."""
    repo, work = tmp_path / "repo", tmp_path / "work"
    repo.mkdir(), work.mkdir()
    (repo / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    (work / "presets.yaml").write_text((PROJECT_ROOT / "presets.yaml").read_text())
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "params"], check=True)
    raw = apply(yaml.safe_load((repo / "params.yaml").read_text()), resolve("fast", PRESETS))
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(work)
    with pytest.raises(PipelineError, match=rf"^{repo}/params.yaml differs from the last commit in train.stem, "):
        main(["--from-commit", "--params", str(repo / "params.yaml"), "fashion"])
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs-here"))
    main(["--from-commit", "--params", str(repo / "params.yaml"), "fast"])


def test_leftover_keys_compare_values_not_spelling():
    committed = {"train": {"lr": 0.001, "channels": [16, 64]}, "plot": {"misclassified": 40}}
    assert leftover_keys({"train": {"lr": 1.0e-3, "channels": [16, 64]}, "plot": {"misclassified": 40}},
                         committed, {}) == []
    workspace = {"train": {"lr": 0.01, "channels": [16, 64], "new": 1}, "plot": None}
    assert leftover_keys(workspace, committed, {}) == ["train.lr", "train.new", "plot"]
    assert leftover_keys(workspace, committed, {"train.lr": 0.1}) == ["train.new", "plot"]


def test_set_param_keys_reads_every_spelling_of_dvc_exp_runs_option():
    args = ["-f", "-S", "train.seed=1", "-Strain.lr=0.1,0.2", "--set-param=augment.copies=2", "--set-param",
            "+train.x=1", "-S", "params.yaml:train.epochs=range(1,3)", "--queue", "-n", "a-name=1"]
    assert set_param_keys(args) == {"train.seed", "train.lr", "augment.copies", "train.x", "train.epochs"}


def test_set_param_keys_reads_an_S_bundled_after_flags_but_not_another_options_value():
    """argparse reads -fS x as -f -S x, and -fSx likewise; -nSx names the run "Sx"."""
    assert set_param_keys(["-fS", "train.seed=1", "-qvSaugment.copies=2"]) == {"train.seed", "augment.copies"}
    assert set_param_keys(["-nStrain.seed=1", "--queue"]) == set()


TUTORIAL_PRESETS = list(PRESETS)[:list(PRESETS).index("aug")]  # presets.yaml lists them before `aug`


def test_a_replaced_run_may_not_be_queued(capsys):
    """make exp REPLACE=1 renames the run over the old one when it ends: a queued run ends after
    make has returned. DVC's parser reads the options, so an abbreviation is caught too."""
    from stages.presets import replace_problem

    for queued in (["--queue"], ["--que"], ["--queue", "-S", "train.seed=range(0,3)"], ["-f", "--queue"]):
        assert replace_problem(queued, "x"), queued
        with pytest.raises(PipelineError, match=r"^REPLACE=1 renames the new run over the old one when it ends.*"
                                                 r"dvc exp remove mlp-512-aug; a grid's are mlp-512-aug-1"):
            main(["--replace", "mlp-512+aug", "--", *queued])
    for run_now in ([], ["-S", "train.note=--queue"], ["--temp"], ["--bogus"]):  # --bogus: dvc exp run refuses it
        assert replace_problem(run_now, "x") is None, run_now
    main(["--replace", "fast", "--", "-S", "train.seed=1"])
    assert capsys.readouterr().out.strip()
    main(["fast", "--", "--queue"])  # without --replace, queueing is fine
    # A -n of EXP_ARGS wins over make's: the run was named foo and the rename found no fast-replacing.
    for named in (["-n", "foo"], ["--name=foo"], ["-nfoo", "-S", "train.seed=1"]):
        with pytest.raises(PipelineError, match=r"^REPLACE=1 runs the preset under its own name, fast, but EXP_ARGS "
                                                 r"names the run foo \(-n\)"):
            main(["--replace", "fast", "--", *named])
    main(["fast", "--", "-n", "foo"])  # without --replace, the user's name is DVC's to take
    main(["--replace"])  # no preset: the names are listed, as without --replace
    assert "fast" in capsys.readouterr().out.split()


def test_a_run_whose_name_is_taken_is_refused_naming_replace(capsys):
    """make exp passes --taken when this commit has an experiment of the preset's name: DVC would
    refuse the run and advise `dvc exp run -f` (every stage again, the download included). Unless
    EXP_ARGS forces it, queues it or names it otherwise: then DVC decides."""
    with pytest.raises(PipelineError, match=r"^this commit has an experiment mlp-512-aug already: `make exp "
                                             r"PRESET=mlp-512\+aug REPLACE=1` runs it again under its name"):
        main(["--taken", "mlp-512+aug", "--", "-S", "train.seed=1"])
    for decided_by_dvc in (["-f"], ["--queue"], ["-n", "other"]):
        main(["--taken", "fast", "--", *decided_by_dvc])
        assert capsys.readouterr().out.strip()
    main(["fast"])  # not taken: nothing to say


@pytest.mark.parametrize("name", TUTORIAL_PRESETS)
def test_tutorial_presets_train_as_the_tutorials_do_whatever_the_defaults_add(name):
    """A tutorial preset reproduces a published recipe, so none of this project's training tricks
    may reach it through params.yaml's defaults: no weight averaging, no lookahead, no test-time
    augmentation, no augmentation, fp32."""
    train = parse(apply(RAW, resolve(name, PRESETS))).train
    assert (train.ema, train.lookahead, train.tta_shift, train.tta_flip, train.precision) == (0.0, 0.0, 0, False, "fp32")
    augment = parse(apply(RAW, resolve(name, PRESETS))).augment
    assert (augment.copies, augment.on_the_fly) == (0, False)


MNIST_CLASSES = [str(d) for d in range(10)]


def test_preset_benchmark_refuses_a_named_preset_of_another_dataset_before_training(tmp_path, capsys):
    """`fashion` on MNIST's prepared splits would print a row of digit accuracy under its name."""
    write_prepared(tmp_path, MNIST_CLASSES)
    with pytest.raises(PipelineError, match=r"^fashion: fetch.dataset is not the dataset prepared in"):
        bench.main(["fast", "fashion", "--data", str(tmp_path)])
    assert capsys.readouterr().out == ""  # refused before any row, header included


def test_preset_benchmark_keeps_the_last_table_until_its_first_row_is_ready(tmp_path, capsys, monkeypatch):
    """--out starts afresh with the first row: a run refused (train.device: cuda without a GPU,
    found before any output) or one stopped before a row left the last table whole; --set
    preprocess.* is refused (the splits are the prepared ones)."""
    write_prepared(tmp_path, MNIST_CLASSES)
    table = tmp_path / "table.md"
    table.write_text("| cnn-max | 99.72% | 486.0 |\n")
    monkeypatch.setattr(bench, "resolve_device", lambda device: pytest.fail("no GPU") if device == "cuda" else None)
    with pytest.raises(pytest.fail.Exception, match="no GPU"):
        bench.main(["fast", "--data", str(tmp_path), "--set", "train.device=cuda", "--out", str(table)])
    assert capsys.readouterr().out == ""  # not even the header
    monkeypatch.setattr(bench, "run_preset", lambda params, splits: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        bench.main(["fast", "--data", str(tmp_path), "--out", str(table)])
    assert table.read_text() == "| cnn-max | 99.72% | 486.0 |\n"
    monkeypatch.setattr(bench, "run_preset", lambda params, splits: (0.5, 1.0))
    bench.main(["fast", "cnn", "--data", str(tmp_path), "--out", str(table)])
    assert table.read_text() == bench.TABLE_HEADER + "| fast | 50.00% | 1.0 |\n| cnn | 50.00% | 1.0 |\n"
    with pytest.raises(SystemExit):
        bench.main(["fast", "--data", str(tmp_path), "--set", "preprocess.seed=7"])
    assert "--set preprocess.seed: the runs use the prepared splits" in capsys.readouterr().err


def test_preset_benchmark_default_list_skips_the_other_dataset_and_runs_the_rest(tmp_path, capsys, monkeypatch):
    write_prepared(tmp_path, MNIST_CLASSES)
    monkeypatch.setattr(bench, "default_specs", lambda presets: ["fast", "fashion", "cnn"])
    ran = []
    monkeypatch.setattr(bench, "run_preset",
                        lambda params, splits: ran.append(params.fetch.dataset) or (0.5, 1.0))  # (accuracy, s)
    bench.main(["--data", str(tmp_path)])
    out, err = capsys.readouterr()
    assert ran == ["mnist", "mnist"]
    assert [line.split(" |")[0] for line in out.splitlines()[2:]] == ["| fast", "| cnn"], out
    assert "skipping fashion: another dataset" in err, err

    # Every entry of the list on another dataset (here by an override): refused, nothing run.
    ran.clear()
    with pytest.raises(PipelineError, match="every preset of the default list: fetch.dataset is not the dataset prepared"):
        bench.main(["--data", str(tmp_path), "--set", "fetch.dataset=fashion-mnist"])
    assert ran == []


def test_preset_benchmark_trains_and_scores_each_preset_for_real(tmp_path, capsys):
    """No stand-in: each preset trains on the splits (augmented as its params say) and its test
    accuracy and time make a row, on stdout and in --out."""
    write_prepared(tmp_path, MNIST_CLASSES, n=200)
    table = tmp_path / "table.md"
    bench.main(["fast", "mlp-100-100+aug", "--data", str(tmp_path), "--set", "train.epochs=1", "--out", str(table)])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (.+) \| (\d+\.\d\d)% \| (\d+\.\d) \|$", out, flags=re.MULTILINE)
    assert [label for label, _, _ in rows] == ["fast train.epochs=1", "mlp-100-100+aug train.epochs=1"], out
    assert all(0 <= float(accuracy) <= 100 and float(seconds) >= 0 for _, accuracy, seconds in rows)
    assert table.read_text() == out


def test_a_benchmarks_set_value_is_read_as_params_yaml_is():
    """--set's value is YAML read as the stages read params.yaml (DVC's YAML 1.2): `010` is ten,
    `yes` text; broken YAML is argparse's one-line usage error."""
    assert [bench.parse_override(text) for text in ("train.seed=010", "a.b=yes", "train.channels=[8, 16]")] == [
        ("train.seed", 10), ("a.b", "yes"), ("train.channels", [8, 16])]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--set", "train.channels=[8"])
    assert exit_info.value.code == 2
