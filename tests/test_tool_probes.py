"""The experiment tools read input the way train.py does: one line on stderr and exit 2 for anything wrong,
before anything trains, and nothing already written is lost.

PROBES is a table of wrong inputs to ``deepplain.sweep``, ``plots``, ``curves``, ``experiments`` and a few
train.py edges: each is run in-process, must exit 2 with one line (no traceback) holding the expected
words, and must leave the files that were there before as they were.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepplain import curves, experiments, plots, sweep
from deepplain.cli import main as train_main
from deepplain.inputs import FolderLock, read_results_csv

GRID = ["--dataset", "usps", "--models", "plain", "--depths", "1", "--seeds", "0", "--epochs", "1"]
FIELDS = ["run_id", "model", "depth", "seed", "variant", "dataset", "status", "test_acc", "train_acc", "epochs_done"]


def write_csv(path: Path, rows: list[list], header=FIELDS) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def good_csv(folder: Path, name: str = "a.csv", run_id: str = "plain-d1-s0") -> Path:
    return write_csv(folder / name, [[run_id, "plain", "1", "0", "", "usps", "completed", "0.9", "0.95", "1"]])


def bomb(levels: int = 9) -> str:
    """About 300 bytes that a YAML loader expands to 9**9 items, hidden in a key train.py knows."""
    lists = [f"&l0 [{','.join(['1'] * 9)}]"] + [f"&l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"milestones: [{', '.join(lists)}]\n"


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# (name, entry point, argv builder given tmp_path, expected words on stderr)
PROBES = [
    ("sweep: the grid's own flag after --", sweep.main,
     lambda t: ["--out", str(t / "s"), *GRID, "--", "--depth", "2"], "--depth after -- would override"),
    ("sweep: --logdir after --", sweep.main,
     lambda t: ["--out", str(t / "s"), *GRID, "--", "--logdir", str(t / "elsewhere")], "--logdir after --"),
    ("sweep: --config after --", sweep.main,
     lambda t: ["--out", str(t / "s"), *GRID, "--", "--config", "x.yaml"], "--config after --"),
    ("sweep: the grid's flag in a variant", sweep.main,
     lambda t: ["--out", str(t / "s"), *GRID, "--variant", "x=--seed 3"], "--seed in --variant x"),
    ("sweep: two variants with one name", sweep.main,
     lambda t: ["--out", str(t / "s"), *GRID, "--variant", "a=--lr 0.1", "--variant", "a=--lr 0.2"],
     "--variant names must be unique; a is given more than once"),
    ("sweep: a depth listed twice", sweep.main,
     lambda t: ["--out", str(t / "s"), *GRID[:4], "--depths", "1,1", "--epochs", "1"], "--depths lists a value twice"),
    ("sweep: --out is a file", sweep.main,
     lambda t: ["--out", str(good_csv(t)), *GRID], "is a file; give a folder"),
    ("sweep: --out cannot be created", sweep.main,
     lambda t: ["--out", "/proc/deepplain-sweep", *GRID], "cannot be created"),
    ("sweep: a malformed earlier results.csv", sweep.main,
     lambda t: (t / "s").mkdir() or write_csv(t / "s" / "results.csv", [["x", "plain", "one", "0"]],
                                              ["run_id", "model", "depth", "seed", "status"])
     and ["--out", str(t / "s"), *GRID], "results CSV"),
    ("sweep: a binary earlier results.csv", sweep.main,
     lambda t: (t / "s").mkdir() or (t / "s" / "results.csv").write_bytes(b"\x00\x01\x02")
     and ["--out", str(t / "s"), *GRID], "is a binary file"),
    ("plots: one CSV twice", plots.main,
     lambda t: ["--csv", str(good_csv(t)), str(t / "a.csv"), "--out", str(t / "f")], "names"),
    ("plots: one run in two CSVs", plots.main,
     lambda t: ["--csv", str(good_csv(t)), str(good_csv(t, "b.csv")), "--out", str(t / "f")],
     "run plain-d1-s0 (usps) is in"),
    ("plots: a row with a field too many", plots.main,
     lambda t: ["--csv", str(write_csv(t / "a.csv", [["x", "plain", "1", "0", "", "usps", "completed", "0.9", "0.9",
                                                       "1", "extra"]])), "--out", str(t / "f")],
     "line 2: 11 fields, the header has 10"),
    ("plots: a non-integer depth", plots.main,
     lambda t: ["--csv", str(write_csv(t / "a.csv", [["x", "plain", "deep", "0", "", "usps", "completed", "0.9", "0.9",
                                                       "1"]])), "--out", str(t / "f")],
     "depth 'deep' is not an integer"),
    ("plots: not UTF-8", plots.main,
     lambda t: (t / "a.csv").write_bytes(b"run_id,model\n\xff\xfe") and ["--csv", str(t / "a.csv"), "--out",
                                                                          str(t / "f")], "is not UTF-8 text"),
    ("plots: a CSV that is not a sweep's", plots.main,
     lambda t: ["--csv", str(write_csv(t / "a.csv", [["1"]], ["x"])), "--out", str(t / "f")], "has no run_id"),
    ("plots: --out is a file", plots.main,
     lambda t: ["--csv", str(good_csv(t)), "--out", str(good_csv(t, "b.csv", "other"))], "is a file; give a folder"),
    ("curves: one name twice", curves.main,
     lambda t: ["--run", f"a={t}", "--run", f"a={t}", "--out", str(t / "c.png")], "--run name 'a' is given twice"),
    ("curves: --out is a folder", curves.main,
     lambda t: ["--run", f"a={t}", "--out", str(t)], "must be a .png file name"),
    ("experiments: the grid's flag after --", experiments.main,
     lambda t: ["diagnostics", "--epochs", "1", "--out", str(t / "e"), "--", "--depth", "3"], "--depth after --"),
    ("experiments: a compared component after --", experiments.main,
     lambda t: ["ablation", "--epochs", "1", "--out", str(t / "e"), "--", "--norm", "bn"],
     "--norm after -- would change what the experiment compares"),
    ("experiments: a bad train.py flag after --", experiments.main,
     lambda t: ["diagnostics", "--epochs", "1", "--out", str(t / "e"), "--", "--width", "0"],
     "--width must be a positive integer"),
    ("experiments: --out is a file", experiments.main,
     lambda t: ["diagnostics", "--epochs", "1", "--out", str(good_csv(t))], "is a file; give a folder"),
    ("train.py: a binary --config", train_main,
     lambda t: (t / "c.yaml").write_bytes(b"\x00\x01PK") and ["--config", str(t / "c.yaml")], "is a binary file"),
    ("train.py: a non-UTF-8 --config", train_main,
     lambda t: (t / "c.yaml").write_bytes(b"depth: \xe9\n") and ["--config", str(t / "c.yaml")], "is not UTF-8 text"),
    ("train.py: a YAML alias bomb", train_main,
     lambda t: (t / "c.yaml").write_text(bomb()) and ["--config", str(t / "c.yaml")], "uses YAML anchors/aliases"),
    ("train.py: a 2 MiB --config", train_main,
     lambda t: (t / "c.yaml").write_text("#" * (2 << 20)) and ["--config", str(t / "c.yaml")], "at most 1,048,576"),
    ("train.py: a fraction of a batch", train_main,
     lambda t: ["--model", "plain", "--depth", "2", "--dataset", "usps", "--limit-train-batches", "0.001",
                "--logdir", str(t / "runs")], "--limit-train-batches 0.001 of 52 batch(es) is less than one batch"),
    ("train.py: an image size the 50-layer PlainNet cannot take", train_main,
     lambda t: ["--model", "plain", "--arch", "conv", "--layout", "oyedotun-50", "--depth", "50", "--dataset",
                "coil20", "--image-size", "4", "--logdir", str(t / "runs")], "cannot take 1x4x4 inputs"),
    ("train.py: DiracNet's ImageNet layout at image size 24", train_main,
     lambda t: ["--model", "dirac", "--arch", "conv", "--layout", "imagenet", "--depth", "18", "--dataset", "coil20",
                "--image-size", "24", "--logdir", str(t / "runs")], "cannot take 1x24x24 inputs"),
]


@pytest.mark.fast
@pytest.mark.parametrize("name,entry,build,expected", PROBES, ids=[p[0] for p in PROBES])
def test_a_wrong_input_is_one_line_and_exit_2(name, entry, build, expected, tmp_path, capsys):
    argv = build(tmp_path)
    before = snapshot(tmp_path)
    code = entry(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (name, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err
    after = snapshot(tmp_path)
    assert all(after.get(p) == data for p, data in before.items()), "a file that was there changed"
    assert not list(tmp_path.rglob("version_*")) and not list(tmp_path.rglob("runs")), "something was trained"


@pytest.mark.fast
@pytest.mark.timeout(120)  # expanding the 9**9 items would take far longer (and gigabytes): the timeout fails it
def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(bomb())
    assert train_main(["--config", str(tmp_path / "bomb.yaml")]) == 2
    assert "anchors/aliases" in capsys.readouterr().err


@pytest.mark.fast
def test_a_sweep_folder_is_written_by_one_sweep_at_a_time(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    with FolderLock(out, "--out"):  # another sweep is running there
        assert sweep.main(["--out", str(out), *GRID]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is in use by another process (pid {os.getpid()})" in err
    assert not (out / "runs").exists()


def test_a_lock_is_released_by_a_process_that_dies(tmp_path):
    script = (f"from deepplain.inputs import FolderLock; import os\n"
              f"FolderLock({str(tmp_path)!r}, 'x').__enter__(); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 9
    with FolderLock(tmp_path, "x"):  # the dead process left the lock file, not the lock
        pass


@pytest.mark.fast
def test_a_quoted_newline_in_a_results_csv_stays_inside_its_row(tmp_path):
    path = write_csv(tmp_path / "a.csv", [["x", "plain", "1", "0", "", "usps", "failed (see\nlog)", "", "", "1"]])
    rows = read_results_csv(path)
    assert len(rows) == 1 and rows[0]["status"] == "failed (see\nlog)"
