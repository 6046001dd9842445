"""Every wrong input gets one line on stderr and a non-zero exit, before anything is read or written.

Over 100 wrong inputs over every flag: wrong types, zero, negative, nan/inf, unknown choices,
out-of-range shares and sizes, impossible depths and memory, hardware flags Lightning refuses,
names that leave the log folder, unwritable log folders, config files, and damaged checkpoints.
"""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from deepplain.cli import main

REPO = Path(__file__).resolve().parents[1]
BASE = ["--model", "plain", "--depth", "3", "--width", "16", "--dataset", "usps"]
VAN = ["--model", "van", "--depth", "3", "--width", "16", "--dataset", "usps"]

# (flags, a piece of the expected message); BASE is prepended unless the flags name --model
BAD = [
    (["--depth", "lots"], "argument --depth: invalid int value: 'lots'"),
    (["--depth", "0"], "--depth must be a positive integer, got 0"),
    (["--depth", "-4"], "--depth must be a positive integer, got -4"),
    (["--depth", "2.5"], "argument --depth: invalid int value: '2.5'"),
    (["--width", "0"], "--width must be a positive integer, got 0"),
    (["--width", "-3"], "--width must be a positive integer, got -3"),
    (["--width", "10000000"], "this run needs about"),
    (["--width", "300", "--depth", "100000"], "this run needs about"),
    (["--batch-size", "100000000"], "this run needs about"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--epochs", "-1"], "--epochs must be a positive integer, got -1"),
    (["--epochs", "ten"], "argument --epochs: invalid int value"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--batch-size", "-8"], "--batch-size must be a positive integer, got -8"),
    (["--lr", "-1"], "--lr must be a positive finite number, got -1.0"),
    (["--lr", "0"], "--lr must be a positive finite number, got 0.0"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "fast"], "argument --lr: invalid float value"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--momentum", "-0.1"], "--momentum must be in [0, 1)"),
    (["--momentum", "nan"], "--momentum must be in [0, 1), got nan"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs --optimizer sgd and a positive --momentum"),
    (["--nesterov", "--optimizer", "adam"], "--nesterov needs --optimizer sgd"),
    (["--optimizer", "lbfgs"], "argument --optimizer: invalid choice: 'lbfgs'"),
    (["--schedule", "step"], "argument --schedule: invalid choice: 'step'"),
    (["--gamma", "-5"], "--gamma must be in (0, 1] (the multistep decay factor), got -5.0"),
    (["--gamma", "0"], "--gamma must be in (0, 1]"),
    (["--gamma", "1.5"], "--gamma must be in (0, 1]"),
    (["--gamma", "nan"], "--gamma must be in (0, 1] (the multistep decay factor), got nan"),
    (["--milestones=-1"], "--milestones must be shares of --epochs in (0, 1) or whole epochs >= 1, got -1.0"),
    (["--milestones", "0.5,abc"], "argument --milestones: expected comma-separated numbers"),
    (["--milestones", "2.5"], "--milestones must be shares of --epochs in (0, 1) or whole epochs >= 1, got 2.5"),
    (["--schedule", "multistep", "--milestones", ","], "--schedule multistep needs --milestones"),
    (["--val-split", "1"], "--val-split must be in [0, 0.9] (0 validates on the test set), got 1.0"),
    (["--val-split", "0.9999"], "--val-split must be in [0, 0.9]"),
    (["--val-split", "-0.1"], "--val-split must be in [0, 0.9]"),
    (["--val-split", "nan"], "--val-split must be in [0, 0.9] (0 validates on the test set), got nan"),
    (["--max-norm", "0"], "--max-norm must be a positive finite number, got 0.0"),
    (["--max-norm", "nan"], "--max-norm must be a positive finite number, got nan"),
    (["--max-norm", "-3"], "--max-norm must be a positive finite number"),
    (["--max-norm-classifier"], "--max-norm-classifier needs --max-norm"),
    (["--activation", "lrelu", "--negative-slope", "1.5"], "--negative-slope must be in [0, 1)"),
    (["--negative-slope", "nan"], "--negative-slope must be in [0, 1), got nan"),
    (["--activation", "tanh"], "argument --activation: invalid choice: 'tanh'"),
    (["--init", "zeros"], "argument --init: invalid choice: 'zeros'"),
    (["--norm", "ln"], "argument --norm: invalid choice: 'ln'"),
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    (["--seed", "99999999999"], "--seed must be an integer in [0, 4294967295]"),
    (["--num-workers", "-3"], "--num-workers must be an integer in [0, 256], got -3"),
    (["--diag-every", "0"], "--diag-every must be a positive integer, got 0"),
    (["--diagnostics", "nosuch"], "unknown diagnostics nosuch; valid: all, none, or a comma list of saturation, "
                                  "condition, grad_flow"),
    (["--diagnostics", "saturation,nosuch"], "unknown diagnostics nosuch"),
    (["--diagnostics", "saturation,saturation"], "--diagnostics names saturation twice; each diagnostic runs once"),
    (["--diagnostics", ""], "--diagnostics is empty; valid: all, none"),
    (["--diagnostics", ","], "--diagnostics ',' has an empty name"),
    (["--diagnostics", "none,saturation"], "--diagnostics: none stands alone, not in a list"),
    (["--accumulate-grad-batches", "0"], "--accumulate-grad-batches must be a positive integer, got 0"),
    (["--limit-train-batches", "0"], "--limit-train-batches must be a count >= 1 or a fraction in (0, 1]"),
    (["--limit-train-batches", "1.5"], "--limit-train-batches must be a count >= 1 or a fraction in (0, 1]"),
    (["--limit-val-batches", "-1"], "--limit-val-batches must be a count >= 1 or a fraction in (0, 1]"),
    (["--limit-train-batches", "nan"], "--limit-train-batches must be a count >= 1 or a fraction in (0, 1]"),
    (["--model", "vgg"], "argument --model: invalid choice: 'vgg'"),
    (["--dataset", "svhn"], "argument --dataset: invalid choice: 'svhn'"),
    (["--arch", "transformer"], "argument --arch: invalid choice"),
    (["--model", "highway", "--arch", "conv"], "highway has no 'conv' form; valid: mlp"),
    (["--model", "van", "--depth", "27"], "van conv depth must be 8n+2 (10, 18, 26, 34, ...; VAN-26 is n=3), got 27"),
    (["--model", "van", "--arch", "conv", "--depth", "27", "--dataset", "fake"], "van conv depth must be 8n+2"),
    (["--model", "dirac", "--arch", "conv", "--depth", "27", "--dataset", "fake"], "dirac conv depth must be 6n+4"),
    (["--model", "resnet", "--arch", "conv", "--depth", "57", "--dataset", "fake"],
     "resnet conv depth must be 6n+2 with basic blocks"),
    (["--model", "resnet", "--arch", "conv", "--depth", "57", "--block", "bottleneck", "--dataset", "fake"],
     "depth must be 9n+2"),
    (["--model", "plain", "--arch", "conv", "--depth", "49", "--layout", "oyedotun-50", "--dataset", "fake"],
     "plain conv layout oyedotun-50 has depth 50, got 49"),
    (["--layout", "unet"], "argument --layout: invalid choice: 'unet'"),
    (["--block", "tee"], "argument --block: invalid choice: 'tee'"),
    (["--model", "van", "--dataset", "usps", "--activation", "lrelu"],
     "--activation applies to --model plain or resnet only, got --model van"),  # the family records' one rule
    (["--gate-bias", "nan"], "--gate-bias must be a finite number, got nan"),
    (["--alpha-mode", "linear"], "--alpha-mode applies to --model van only"),
    (["--phase-out", "0.5"], "--phase-out applies to --model van only"),
    (VAN + ["--alpha-mode", "sideways"], "argument --alpha-mode: invalid choice: 'sideways'"),
    (VAN + ["--lambda-lr-ratio", "nan"], "--lambda-lr-ratio must be a finite number >= 0, got nan"),
    (VAN + ["--lambda-lr-ratio", "-1"], "--lambda-lr-ratio must be a finite number >= 0"),
    (VAN + ["--phase-out-epochs", "-3"], "--phase-out must be a share of training in (0, 1) or an epoch >= 1"),
    (VAN + ["--phase-out", "0"], "--phase-out must be a share of training in (0, 1) or an epoch >= 1, got 0.0"),
    (VAN + ["--phase-out", "500"], "--phase-out 500 is an epoch after the last one (--epochs 50)"),
    (VAN + ["--phase-out", "nan"], "--phase-out must be a share of training in (0, 1) or an epoch >= 1, got nan"),
    (["--dataset", "coil20", "--image-size", "100000"], "--image-size must be an integer in [4, 1024], got 100000"),
    (["--dataset", "coil20", "--image-size", "2"], "--image-size must be an integer in [4, 1024], got 2"),
    (["--image-size", "8"], "--image-size applies to coil20 and imagefolder, got --dataset usps"),
    (["--precision", "7"], "--precision 7: Precision '7' is invalid. Allowed precision values:"),
    (["--precision", "64-wrong"], "--precision 64-wrong: Precision '64-wrong' is invalid"),
    (["--precision", "transformer-engine"], "--precision transformer-engine:"),
    (["--accelerator", "gpu"], "--accelerator gpu:"),
    (["--accelerator", "nonsense"], "--accelerator nonsense: You selected an invalid accelerator name"),
    (["--devices", "0"], "--devices 0: `Trainer(devices=0)` value is not a valid input using cpu accelerator"),
    (["--devices", "-5"], "--devices -5:"),
    (["--devices", "1,2"], "--devices 1,2:"),
    (["--devices", "many"], "argument --devices: expected auto, a count or a comma list"),
    (["--strategy", "nonsense"], "--strategy nonsense: You selected an invalid strategy name"),
    (["--num-nodes", "0"], "--num-nodes must be a positive integer, got 0"),
    (["--num-nodes", "2", "--accelerator", "cpu", "--devices", "1", "--strategy", "ddp"],
     "--num-nodes 2 needs a multi-node launcher"),
    (["--dist-timeout", "0"], "--dist-timeout must be a number of seconds in [10, 86400], got 0"),
    (["--name", "../x"], "--name must be one folder name"),
    (["--name", "/abs"], "--name must be one folder name"),
    (["--name", ".."], "--name must be one folder name"),
    (["--name=-rf"], "--name must be one folder name"),
    (["--name", "a" * 300], "--name is 300 bytes long; at most 200 are allowed"),
    (["--logdir", ""], "--logdir must be a folder name, got ''"),
    (["--logdir", "/sys/deepplain-runs"], "--logdir /sys/deepplain-runs: cannot create folders in /sys"),
    (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    (["--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir"),
    (["--data-dir", "/nonexistent/typo"], "USPS not found: searched /nonexistent/typo (from --data-dir)"),
    (["--resume", "/nonexistent/last.ckpt"], "--resume checkpoint /nonexistent/last.ckpt does not exist"),
    (["--resume", "/tmp"], "--resume takes a checkpoint file; /tmp is a folder"),
    (["--batch-size", "1"], "--batch-size 1 cannot train the batch norm of this plain MLP: a batch of one sample has "
                            "one value per unit and no batch statistics; use --batch-size 2 or more or --norm none"),
]


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()], err


@pytest.mark.fast
@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f)[:60] for f, _ in BAD])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(flags, message, capsys, tmp_path):
    runs = tmp_path / "runs"
    argv = flags if "--model" in flags else [*BASE, *flags]
    if "--logdir" not in argv:
        argv = [*argv, "--logdir", str(runs)]
    code, lines, err = run_cli([*argv, "--no-progress"], capsys)
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not runs.exists(), "a folder was written before the input was checked"


@pytest.mark.fast
def test_there_are_over_sixty_wrong_inputs():
    assert len(BAD) + len(DAMAGED) + len(CONFIG_FILES) >= 60


# -- a log folder that is a file -------------------------------------------------------------------
@pytest.mark.fast
def test_logdir_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "runs"
    file.write_text("not a folder")
    code, lines, err = run_cli([*BASE, "--logdir", str(file)], capsys)
    assert code == 2 and len(lines) == 1 and f"--logdir {file} is a file, not a folder" in lines[0]
    assert file.read_text() == "not a folder"


# -- config files ------------------------------------------------------------------------------------
CONFIG_FILES = [
    ("missing.yaml", None, "cannot read it"),
    ("broken.yaml", "depth: [3,\n", "is not valid YAML"),
    ("list.yaml", "- 3\n- 4\n", "must be a mapping of flag names to values, got list"),
    ("unknown.yaml", "depht: 3\n", "unknown key 'depht'; valid keys:"),
    ("type.yaml", "depth: abc\n", "argument --depth: invalid int value: 'abc'"),
    ("flag.yaml", "nesterov: maybe\n", "nesterov must be true or false"),
    ("range.yaml", "lr: -0.5\n", "--lr must be a positive finite number, got -0.5"),
]


@pytest.mark.fast
@pytest.mark.parametrize("name,text,message", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file(name, text, message, tmp_path, capsys):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    code, lines, err = run_cli(["--config", str(path), *BASE, "--logdir", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "runs").exists()


# -- damaged checkpoints and run folders for --resume -------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("finished") / "runs"
    assert main([*BASE, "--epochs", "1", "--limit-train-batches", "3", "--limit-val-batches", "1", "--diagnostics",
                 "none", "--logdir", str(runs), "--no-progress"]) == 0
    return next(runs.glob("*/version_0"))


def damage(kind, run: Path, ckpt: Path):
    data = ckpt.read_bytes()
    if kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "text":
        ckpt.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        ckpt.write_bytes(data[:20000])
    elif kind == "byte-flipped":  # one bit of rot in the largest tensor (torch.load alone would not notice)
        with zipfile.ZipFile(ckpt) as archive:
            record = max(archive.infolist(), key=lambda i: i.file_size)
        offset = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + record.file_size // 2
        flipped = bytearray(data)
        flipped[offset] ^= 0x10
        ckpt.write_bytes(bytes(flipped))
    elif kind == "nan-weights":
        state = torch.load(ckpt, weights_only=False)
        key = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
        state["state_dict"][key].fill_(float("nan"))
        torch.save(state, ckpt)
    elif kind == "bad-config":
        (run / "config.json").write_text("{not json")
    elif kind == "not-lightning":
        torch.save({"weights": torch.zeros(3)}, ckpt)


DAMAGED = [("empty", "is empty"), ("text", "is not a checkpoint"), ("truncated", "is not a checkpoint"),
           ("byte-flipped", "is corrupt (record"), ("nan-weights", "holds non-finite weights"),
           ("bad-config", "config.json is unreadable or malformed"), ("not-lightning", "is not a training checkpoint")]


@pytest.mark.parametrize("kind,message", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_failed_resume_leaves_the_run_folder_untouched(kind, message, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    damage(kind, run, ckpt)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, lines, err = run_cli(["--resume", str(ckpt), "--epochs", "2", "--no-progress"], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # the summary still says completed, with its test metrics
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_acc"] is not None


def test_resume_refuses_changed_model_flags_and_a_finished_run(finished_run, capsys):
    ckpt = finished_run / "checkpoints" / "last.ckpt"
    code, lines, _ = run_cli(["--resume", str(ckpt), "--depth", "5"], capsys)
    assert code == 2 and "these flags cannot change: --depth" in lines[0]
    code, lines, _ = run_cli(["--resume", str(ckpt)], capsys)
    assert code == 2 and "already finished 1 epoch(s); pass --epochs N with N > 1" in lines[0]


def test_bad_input_in_a_real_process_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *BASE, "--precision", "7", "--logdir",
                           str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --precision 7:"), proc.stderr
    assert not (tmp_path / "runs").exists()
