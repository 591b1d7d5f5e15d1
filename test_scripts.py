"""test_scripts.py: end to end on tiny data, on CPU. Every script trains, checkpoints,
resumes from the saved step, evaluates and prints `linear top-1: XX.XX%` last; bad input
ends with one clear line and no traceback; a NaN loss leaves the last checkpoint intact.
The copied sections of the method files are still copies of simclr.py's.

    python test_scripts.py --fix-copies   # re-sync them all from simclr.py
"""
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--data", "synthetic", "--arch", "resnet18", "--batch", "64", "--warmup-epochs", "1",
        "--knn-every", "1", "--lin-epochs", "15", "--lin-batch", "64", "--log-every", "2"]


METHODS = ("sogclr.py", "dcl.py", "flatnce.py", "polyview.py")
COPY = re.compile(r"^# --- copied: (.+?) ---\n(.*?)^# --- end copied: \1 ---\n", re.M | re.S)


def copied_sections(text):
    """{name: body} of every copied section, in order (Transformers' `# Copied from`, by block)."""
    return {m.group(1): m.group(2) for m in COPY.finditer(text)}


def fix_copies():
    """Overwrite every method file's copied sections with simclr.py's."""
    reference = open(os.path.join(HERE, "simclr.py")).read()
    originals = copied_sections(reference)
    for name in METHODS:
        path = os.path.join(HERE, name)
        text = open(path).read()
        missing = set(originals) - set(copied_sections(text))
        if missing:
            sys.exit(f"{name} has no copied section {', '.join(sorted(missing))}: "
                     "add its markers by hand first")
        fixed = COPY.sub(lambda m: m.group(0).replace(m.group(2), originals[m.group(1)], 1), text)
        if fixed != text:
            open(path, "w").write(fixed)
            print(f"re-synced {name}")


def command(script, *args, nproc=1, env=None):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
                              if nproc > 1 else [])
    # CUDA_VISIBLE_DEVICES empty: the scripts run on the CPU even on a GPU machine. The
    # bit-identical resume tests hold only there (cudnn.benchmark and bf16 make GPU gradients
    # vary run to run), and the 2-process runs would otherwise ask a 1-GPU machine for a
    # second GPU.
    env = dict(os.environ,
               OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
               CUDA_VISIBLE_DEVICES="", **(env or {}))
    return dict(args=cmd + [os.path.join(HERE, script)] + list(args), env=env, cwd=HERE,
                stdin=subprocess.DEVNULL)


def run(script, *args, nproc=1, env=None, timeout=600):
    return subprocess.run(**command(script, *args, nproc=nproc, env=env), capture_output=True,
                          text=True, timeout=timeout)


def last_line(out):
    return out.strip().splitlines()[-1] if out.strip() else ""


def log_records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_one_clear_line(p, *needles):
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    line = last_line(p.stderr)
    assert line.startswith("error: "), p.stderr
    for needle in needles:
        assert needle in line, line


# ----------------------------------------------------------------------------- copies


def copy_errors(name, text, reference):
    """What is wrong with the copied sections of `name` (its `text`) against simclr.py's."""
    originals, copies = copied_sections(reference), copied_sections(text)
    first_line = {m.group(1): text[:m.start(2)].count("\n") + 1 for m in COPY.finditer(text)}
    errors = [f"{name}: copied section {section!r} is missing"
              for section in originals if section not in copies]
    for section in set(originals) & set(copies):
        a, b = originals[section].splitlines() + [""], copies[section].splitlines() + [""]
        diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diff is not None or len(a) != len(b):
            i = min(len(a), len(b)) - 1 if diff is None else diff
            errors.append(f"{name}:{first_line[section] + i}: copied section {section!r} "
                          f"differs from simclr.py's: simclr.py has {a[i]!r}, {name} {b[i]!r}; "
                          "edit simclr.py, then `python test_scripts.py --fix-copies`")
    return errors


@pytest.mark.parametrize("name", METHODS)
def test_copied_sections_equal_simclr(name):
    """Every section marked as copied is, character for character, simclr.py's."""
    reference = open(os.path.join(HERE, "simclr.py")).read()
    assert list(copied_sections(reference)) == ["imports", "arguments", "setup", "training loop",
                                                "evaluation", "main"]
    errors = copy_errors(name, open(os.path.join(HERE, name)).read(), reference)
    assert not errors, "\n".join(errors)


def test_copy_check_names_file_and_section_of_one_changed_character():
    reference, text = (open(os.path.join(HERE, n)).read() for n in ("simclr.py", "dcl.py"))
    body = copied_sections(text)["training loop"]
    changed = text.replace(body, body.replace("step + 1", "step + 2", 1), 1)
    errors = copy_errors("dcl.py", changed, reference)
    line = changed[:changed.index("step + 2")].count("\n") + 1
    assert len(errors) == 1 and errors[0].startswith(
        f"dcl.py:{line}: copied section 'training loop' differs"), errors
    assert "step + 2" in errors[0]
    # an emptied section
    assert copy_errors("dcl.py", text.replace(copied_sections(text)["main"], ""), reference)
    # lost marker
    assert copy_errors("dcl.py", text.replace("# --- copied: setup", "# setup"), reference)


# ------------------------------------------------------------------------- train, resume, evaluate


@pytest.mark.parametrize("nproc,workers", [(1, "0"), (2, "1")])
def test_simclr_trains_checkpoints_resumes_evaluates(tmp_path, nproc, workers):
    out = str(tmp_path / "run")
    first = run("simclr.py", *TINY, "--epochs", "1", "--workers", workers, "--out-dir", out,
                nproc=nproc)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.fullmatch(r"linear top-1: \d+\.\d\d%", last_line(first.stdout)), first.stdout
    steps = 384 // 64  # synthetic has 384 training images
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, steps)
    assert {"model", "optimizer", "criterion", "rng", "args", "fixed", "script"} <= set(ckpt)
    assert len(ckpt["rng"]) == nproc
    assert os.path.exists(os.path.join(out, "backbone.pt"))
    n_first = len(log_records(out))

    second = run("simclr.py", *TINY, "--epochs", "2", "--workers", workers, "--out-dir", out,
                 nproc=nproc)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from epoch 1 (step 6)" in second.stdout
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 2 * steps)
    new = log_records(out)[n_first:]
    train_steps = [r["step"] for r in new if "step" in r]
    assert train_steps and min(train_steps) > steps, train_steps  # continued, not restarted
    assert all(r["epoch"] == 2 for r in new if "step" in r)
    acc = float(re.search(r"([\d.]+)%", last_line(second.stdout)).group(1))
    # 10 classes; far above chance unless features or labels are misaligned
    assert acc > 30, second.stdout
    assert any("knn_top1" in r for r in new)


# ----------------------------------------------------------------------------- bad input


def test_missing_data_path():
    p = run("simclr.py", "--data", "/no/such/imagenet", "--epochs", "1")
    assert_one_clear_line(p, "/no/such/imagenet")


def test_batch_not_divisible_by_processes():
    # The check runs before the process group starts, so the torchrun environment alone
    # (no peers) is enough to exercise it without torchrun's own failure report.
    p = run("simclr.py", "--data", "synthetic", "--batch", "63",
            env=dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="1"))
    assert_one_clear_line(p, "--batch 63", "multiple of 2")


def test_more_processes_than_gpus(monkeypatch):
    """torchrun --nproc_per_node=2 on a 1-GPU machine: every rank stops with one line that names
    the GPU count, before set_device (which dies with 'invalid device ordinal') and before
    init_process_group (where the other ranks would wait). On the CPU, with a GPU machine's
    answers put in."""
    import simclr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: pytest.fail("set_device was reached"))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("init was reached"))
    for local_rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(simclr.BadInput, match=r"^2 processes per node but 1 GPU\(s\): "
                                                  r"use --nproc_per_node=1, or "
                                                  r"CUDA_VISIBLE_DEVICES= to run on the CPU$"):
            simclr.setup(None)


def test_max_autotune_is_refused_under_ddp():
    p = run("simclr.py", "--data", "synthetic", "--compile", "max-autotune",
            env={"WORLD_SIZE": "2"})
    assert_one_clear_line(p, "--compile max-autotune can hang with 2 processes",
                          "use --compile default")


def test_unknown_arch():
    p = run("simclr.py", "--data", "synthetic", "--arch", "resnet99")
    assert_one_clear_line(p, "resnet99")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_image_is_named(tmp_path, workers):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / split / cls)
            for i in range(4):
                Image.new("RGB", (48, 40), (60 * i, 100 if cls == "a" else 200, 30)).save(
                    tmp_path / split / cls / f"{i}.png")
    broken = tmp_path / "train" / "b" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = str(tmp_path / "run")
    p = run("simclr.py", "--data", str(tmp_path), "--arch", "resnet18", "--batch", "9",
            "--epochs", "1", "--workers", workers, "--out-dir", out)
    assert_one_clear_line(p, str(broken))
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))


def test_jpeg_folder_trains_through_worker_crops(tmp_path):
    """A photo folder goes through Crops in 2 workers (JPEG draft decode, uint8 crops) and the
    batched augmentation, with 4 views (Poly-View) and spectral batches (whose embedding pass
    reads the same crops), then the probe on the folder's val/."""
    from PIL import Image

    for split in ("train", "val"):
        for k, cls in enumerate(("a", "b")):
            os.makedirs(tmp_path / split / cls)
            for i in range(6):
                Image.new("RGB", (400, 300), (40 * i, 90 + 100 * k, 30)).save(
                    tmp_path / split / cls / f"{i}.jpg")
    out = str(tmp_path / "run")
    p = run("polyview.py", "--data", str(tmp_path), "--arch", "resnet18", "--batch", "6",
            "--epochs", "1", "--workers", "2", "--lin-epochs", "1", "--lin-batch", "6",
            "--knn-every", "1", "--out-dir", out, "--batching", "spectral", "--sc-clusters", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert last_line(p.stdout).startswith("linear top-1:")
    assert any("knn_top1" in r for r in log_records(out))


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    good = run("simclr.py", *TINY, "--epochs", "1", "--workers", "0", "--knn-every", "0",
               "--lin-epochs", "1", "--out-dir", out)
    assert good.returncode == 0, good.stderr[-3000:]
    path = os.path.join(out, "checkpoint.pt")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    # An absurd learning rate makes the weights, then the loss, blow up within a few steps.
    bad = run("simclr.py", *TINY, "--epochs", "2", "--workers", "0", "--lr", "1e30",
              "--log-every", "1", "--out-dir", out)
    assert_one_clear_line(bad, "non-finite loss", "intact")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert not os.path.exists(path + ".tmp")


# ----------------------------------------------------------------------------- the other methods


PV_SMOKE = ["--data", "synthetic", "--arch", "resnet18", "--batch", "32", "--workers", "0",
            "--knn-every", "0", "--lin-epochs", "2", "--pv-views", "3", "--subset", "128",
            "--lin-batch", "64"]


SMALL = ["--data", "synthetic", "--arch", "resnet18", "--batch", "32", "--workers", "0",
         "--knn-every", "0", "--lin-epochs", "2", "--lin-batch", "64", "--subset", "128",
         "--log-every", "1"]


@pytest.mark.parametrize("script,flags,nproc", [
    ("dcl.py", [], 1), ("dcl.py", ["--dcl-sigma", "0.5"], 1), ("flatnce.py", [], 1),
    # rank 0 clusters, broadcasts
    ("simclr.py", ["--batching", "spectral", "--sc-clusters", "2"], 2)])
def test_method_trains_resumes_evaluates(tmp_path, script, flags, nproc):
    out = str(tmp_path / "run")
    first = run(script, *SMALL, *flags, "--epochs", "1", "--out-dir", out, nproc=nproc)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(script, *SMALL, *flags, "--epochs", "2", "--out-dir", out, nproc=nproc)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from epoch 1 (step 4)" in second.stdout
    assert re.fullmatch(r"linear top-1: \d+\.\d\d%", last_line(second.stdout)), second.stdout
    records = [r for r in log_records(out) if "step" in r]
    assert [r["step"] for r in records] == list(range(1, 9))
    if script == "flatnce.py":
        assert all(0 < r["p_pos"] < 1 for r in records)  # p+ of the InfoNCE softmax is logged
    # Cho et al.'s measure is logged at every rebuild, for both kinds of batch
    if "spectral" in flags:
        hard = [r for r in log_records(out) if "spectral_batch_loss" in r]
        assert len(hard) == 2 and all(r["random_batch_loss"] > 0 for r in hard)
        # the solver's convergence, per rebuild
        assert all(0 <= r["spectral_eig_residual"] <= 1e-4 for r in hard)


@pytest.mark.parametrize("batching", [
    [], ["--batching", "spectral", "--sc-every", "2", "--sc-clusters", "2"]])
def test_sogclr_resume_is_exact(tmp_path, batching):
    """Two epochs in one go and one epoch plus a resumed one give bit-identical weights,
    optimizer state and u: the checkpoint holds everything the run depends on. With
    spectral batches rebuilt every 2 epochs, the resumed epoch reuses the saved batches."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    for out, epochs in ((straight, ["2"]), (split, ["1", "2"])):
        for e in epochs:
            p = run("sogclr.py", *SMALL, *batching, "--epochs", e, "--warmup-epochs", "1",
                    "--out-dir", out)
            assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from epoch 1 (step 4)" in p.stdout
    a, b = (torch.load(os.path.join(o, "checkpoint.pt"), weights_only=True)
            for o in (straight, split))
    assert a["step"] == b["step"] == 8
    u = a["criterion"]["u"]
    assert u.shape == (128,) and (u > 0).all()  # one entry per training image, every one visited
    assert torch.equal(u, b["criterion"]["u"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["mu"], b["optimizer"]["state"][k]["mu"]), k
    if batching:
        assert a["batches"].shape == (4, 32) and torch.equal(a["batches"], b["batches"])
        assert len(a["batches"].flatten().unique()) == 128


def test_kill_9_mid_epoch_resumes_bit_identical(tmp_path):
    """SIGKILL in the middle of epoch 2, then the same command again: the run restarts from the
    epoch-1 checkpoint and ends bit-identical (weights, optimizer, u) to an uninterrupted run."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    flags = [*SMALL, "--epochs", "2", "--warmup-epochs", "1"]
    assert run("sogclr.py", *flags, "--out-dir", straight).returncode == 0
    proc = subprocess.Popen(**command("sogclr.py", *flags, "--out-dir", killed),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = os.path.join(killed, "log.jsonl"), time.time() + 600
    while proc.poll() is None and time.time() < deadline:  # kill once a step of epoch 2 is logged
        # a line may be half written
        if os.path.exists(log) and '{"epoch": 2, "step"' in open(log).read():
            proc.kill()
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed in epoch 2"
    assert torch.load(os.path.join(killed, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    assert max(r["step"] for r in log_records(killed) if "step" in r) < 8  # it died inside epoch 2
    again = run("sogclr.py", *flags, "--out-dir", killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from epoch 1 (step 4)" in again.stdout
    a, b = (torch.load(os.path.join(o, "checkpoint.pt"), weights_only=True)
            for o in (straight, killed))
    assert a["step"] == b["step"] == 8 and torch.equal(a["criterion"]["u"], b["criterion"]["u"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["mu"], b["optimizer"]["state"][k]["mu"]), k


def test_fp16_is_refused_on_the_cpu():
    p = run("simclr.py", "--data", "synthetic", "--precision", "fp16")
    assert_one_clear_line(p, "--precision fp16 is for GPUs without bf16", "use fp32")


def test_fp16_grad_scaler_is_checkpointed_and_resumes_exactly(tmp_path, monkeypatch):
    """The fp16 path's GradScaler: its state is in the checkpoint, and one epoch plus a resumed
    one ends bit-identical, scaler included, to two epochs in one go. In process, with the
    forward in fp32: CPU fp16 autocast is refused (minutes a step), and what this checks is the
    scaler's bookkeeping, which is the same on every device."""
    import common
    import simclr

    forward = common.forward_views
    monkeypatch.setattr(common, "forward_views", lambda net, views, precision: forward(net, views))
    monkeypatch.setattr(sys, "argv", ["simclr.py", "--data", "synthetic", "--arch", "resnet18",
                                      "--batch", "4", "--subset", "8", "--warmup-epochs", "1",
                                      "--workers", "0", "--knn-every", "0"])

    def pretrain(out, epochs):
        args = simclr.get_args()
        args.out_dir, args.epochs = out, epochs
        device = simclr.setup(args)
        args.precision = "fp16"  # after check_args, which refuses it on the CPU
        train_set, meta = common.train_dataset("synthetic", "", 8, 0, 2, device)
        model = common.make_model("resnet18", meta["size"], meta["channels"], device)
        simclr.pretrain(args, model, train_set, meta, None)

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    pretrain(straight, 2)
    pretrain(split, 1)
    pretrain(split, 2)
    a, b = (torch.load(os.path.join(o, "checkpoint.pt"), weights_only=True)
            for o in (straight, split))
    assert a["args"]["precision"] == "fp16" and a["step"] == b["step"] == 4
    # the growth tracker counts the steps since the last overflow: a fresh scaler would be at 2
    assert a["scaler"] and a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert all(torch.isfinite(v).all() for v in a["model"].values())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One epoch of simclr.py and of polyview.py on SMALL: checkpoints for the resume-error
    tests."""
    made = {}
    for script, extra in (("simclr.py", []), ("polyview.py", ["--pv-views", "3"])):
        out = str(tmp_path_factory.mktemp(script.split(".")[0]))
        p = run(script, *SMALL, *extra, "--epochs", "1", "--lin-epochs", "1", "--out-dir", out)
        assert p.returncode == 0, p.stderr[-3000:]
        made[script] = os.path.join(out, "checkpoint.pt")
    return made


@pytest.mark.parametrize("writer,script,change,needles", [
    ("simclr.py", "simclr.py", "truncate", ["damaged or truncated", "move it away"]),
    ("simclr.py", "sogclr.py", [], ["written by simclr.py", "this is sogclr.py"]),
    ("simclr.py", "simclr.py", ["--arch", "resnet34"], ["--arch resnet18", "--arch resnet34"]),
    ("simclr.py", "simclr.py", ["--batch", "16"], ["--batch 32", "--batch 16"]),
    ("simclr.py", "simclr.py", ["--subset", "96"], ["--subset 128", "--subset 96"]),
    ("polyview.py", "polyview.py", ["--pv-views", "2"], ["--pv-views 3", "--pv-views 2"])])
def test_resume_errors_name_the_cause(tmp_path, checkpoints, writer, script, change, needles):
    """A checkpoint that the run cannot continue ends it with one line naming the cause (a
    damaged file, the script that wrote it, the flag and both values); the checkpoint is not
    touched."""
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    data = open(checkpoints[writer], "rb").read()
    path.write_bytes(data[: len(data) // 2] if change == "truncate" else data)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    flags = list(SMALL) + (["--pv-views", "3"] if writer == "polyview.py" else [])
    for flag, value in zip(change[::2], change[1::2]) if change != "truncate" else []:
        i = flags.index(flag) if flag in flags else None
        flags = (flags[:i] + [flag, value] + flags[i + 2:] if i is not None
                 else flags + [flag, value])
    p = run(script, *flags, "--epochs", "2", "--out-dir", str(out))
    assert_one_clear_line(p, str(path), *needles)
    assert (hashlib.sha256(path.read_bytes()).hexdigest() == before
            and not os.path.exists(str(path) + ".tmp"))


@pytest.mark.parametrize("script,flag,value", [("dcl.py", "--dcl-sigma", "0"),
                                               ("sogclr.py", "--sogclr-gamma", "1.5"),
                                               ("polyview.py", "--pv-views", "1")])
def test_method_flags_are_checked(tmp_path, script, flag, value):
    p = run(script, "--data", "synthetic", flag, value, "--out-dir", str(tmp_path / "run"))
    assert_one_clear_line(p, flag)
    assert not os.path.exists(tmp_path / "run")


def test_polyview_trains_resumes_evaluates(tmp_path):
    out = str(tmp_path / "run")
    first = run("polyview.py", *PV_SMOKE, "--epochs", "1", "--out-dir", out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.fullmatch(r"linear top-1: \d+\.\d\d%", last_line(first.stdout)), first.stdout
    steps = 128 // 32  # --subset 128
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == steps
    second = run("polyview.py", *PV_SMOKE, "--epochs", "2", "--out-dir", out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from epoch 1 (step {steps})" in second.stdout
    assert re.fullmatch(r"linear top-1: \d+\.\d\d%", last_line(second.stdout)), second.stdout
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 2 * steps


# ----------------------------------------------------------------------------- your own images


def photos(folder, n, size=(120, 90)):
    """n small photos under folder, in nested subfolders and in two formats."""
    from PIL import Image

    for i in range(n):
        path = os.path.join(folder, f"{i % 3}", f"{i}.{'png' if i % 2 else 'jpg'}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", size, (20 * i % 256, 100 + 40 * (i % 3), 30)).save(path)


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory):
    """simclr.py on a folder of 12 unlabelled photos (and a file that is not an image)."""
    root = tmp_path_factory.mktemp("unlabelled")
    photos(str(root / "photos"), 12)
    (root / "photos" / "notes.txt").write_text("not an image")
    out = str(root / "run")
    p = run("simclr.py", "--data", str(root / "photos"), "--arch", "resnet18", "--batch", "6",
            "--epochs", "1", "--workers", "1", "--out-dir", out)
    return p, out


def test_unlabelled_folder_pretrains_and_skips_evaluation(unlabelled_run):
    p, out = unlabelled_run
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pretraining on 12 images" in p.stdout  # recursively, image files only
    assert last_line(p.stdout) == (
        "no labels, no evaluation (see --eval-data); backbone: " + out + "/backbone.pt")
    assert os.path.exists(os.path.join(out, "backbone.pt"))
    assert not any("knn_top1" in r or "linear_top1" in r for r in log_records(out))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["fixed"]["data"] == (
        "<a folder of 12 images>")


def test_unlabelled_folder_with_eval_data_under_torchrun(tmp_path):
    """--eval-data gives an unlabelled folder's run a labelled one for the kNN monitor and the
    probe, on 2 processes; an empty folder and unlabelled --eval-data end with one line."""
    photos(str(tmp_path / "photos"), 12)
    for split in ("train", "val"):
        for k in ("a", "b"):
            photos(str(tmp_path / "labelled" / split / k), 4, size=(80, 100))
    out = str(tmp_path / "run")
    p = run("simclr.py", "--data", str(tmp_path / "photos"), "--eval-data",
            str(tmp_path / "labelled"), "--arch", "resnet18", "--batch", "6", "--epochs", "1",
            "--workers", "1", "--knn-every", "1", "--lin-epochs", "2", "--lin-batch", "4",
            "--out-dir", out, nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("pretraining on 12 images; evaluating on 8 training, 8 validation images of "
            + str(tmp_path / "labelled")) in p.stdout
    assert re.fullmatch(r"linear top-1: \d+\.\d\d%", last_line(p.stdout)), p.stdout
    assert any("knn_top1" in r for r in log_records(out))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    p = run("simclr.py", "--data", str(tmp_path / "empty"), "--out-dir", out)
    assert_one_clear_line(p, str(tmp_path / "empty"), "no image files")
    p = run("simclr.py", "--data", "synthetic", "--eval-data", str(tmp_path / "photos"),
            "--out-dir", str(tmp_path / "other"))
    assert_one_clear_line(p, str(tmp_path / "photos"), "train")


def write_stl10(root, sizes):
    """A stand-in STL-10 in its binary format (torchvision's layout): (images, labels) per split,
    each image's channels stored column by column, labels 1-10 on disk."""
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder)
    made = {}
    for split, n in sizes.items():
        g = torch.Generator().manual_seed(n)
        x = torch.randint(0, 256, (n, 3, 96, 96), generator=g, dtype=torch.uint8)
        y = torch.arange(n) % 10 if split != "unlabeled" else torch.full((n,), -1)
        x.transpose(2, 3).contiguous().numpy().tofile(os.path.join(folder, f"{split}_X.bin"))
        if split != "unlabeled":
            (y + 1).to(torch.uint8).numpy().tofile(os.path.join(folder, f"{split}_y.bin"))
        made[split] = x, y
    return made


def test_stl10_pretrains_on_train_and_unlabeled_offline(tmp_path, monkeypatch):
    """STL-10 as its papers use it, from a stand-in in the binary format: pretraining on train +
    unlabeled, kNN and probe on train, scored on test; the reader gives torchvision's arrays."""
    import common
    import torchvision

    made = write_stl10(str(tmp_path), dict(train=20, test=10, unlabeled=30))
    x, y = common._torchvision_set("stl10", str(tmp_path), "train+unlabeled")
    assert torch.equal(x, torch.cat([made["train"][0], made["unlabeled"][0]]))
    assert torch.equal(y, torch.cat([made["train"][1], made["unlabeled"][1]]))
    # torchvision reads the same files alike (its checksums are the real files')
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    theirs = torchvision.datasets.STL10(str(tmp_path), split="train+unlabeled")
    assert torch.equal(x, torch.from_numpy(theirs.data))
    assert torch.equal(y, torch.from_numpy(theirs.labels).long())
    out = str(tmp_path / "run")
    p = run("simclr.py", "--data", "stl10", "--data-root", str(tmp_path), "--arch", "resnet18",
            "--batch", "10", "--epochs", "1", "--workers", "0", "--knn-every", "1",
            "--lin-epochs", "1", "--lin-batch", "10", "--out-dir", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert ("pretraining on 50 images; evaluating on 20 training, 10 validation images of "
            "stl10") in p.stdout
    assert re.fullmatch(r"linear top-1: \d+\.\d\d%", last_line(p.stdout)), p.stdout
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["step"] == 5


README_LOAD = re.compile(r"^## Using the backbone\n.*?^```python\n(.*?)^```", re.M | re.S)


@pytest.mark.parametrize("run_of", ["photos", "small images"])
def test_readme_lines_load_backbone_into_torchvision(tmp_path, unlabelled_run, checkpoints,
                                                     run_of):
    """The README's lines, as written (resnet18 for resnet50, the test's path, and the two CIFAR
    stem lines switched on for small images), load backbone.pt strictly into torchvision's
    ResNet, which then gives the features of the script's own backbone from checkpoint.pt."""
    import common

    code = README_LOAD.search(open(os.path.join(HERE, "README.md")).read()).group(1)
    out = (unlabelled_run[1] if run_of == "photos"
           else os.path.dirname(checkpoints["simclr.py"]))
    code = code.replace("resnet50", "resnet18").replace(
        "runs/default/backbone.pt", os.path.join(out, "backbone.pt"))
    if run_of == "small images":
        code = re.sub(r"^# (backbone\.(conv1|maxpool) = )", r"\1", code, flags=re.M)
        assert code.count("backbone.conv1 =") == 1 and code.count("backbone.maxpool =") == 1
    scope = {}
    exec(code, scope)
    backbone, size = scope["backbone"], 224 if run_of == "photos" else 32
    model = common.make_model("resnet18", size, 3, "cpu")
    model.load_state_dict(torch.load(os.path.join(out, "checkpoint.pt"),
                                     weights_only=True)["model"])
    model.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model.backbone(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- real data


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FMNIST),
                    reason="Debian's dataset-fashion-mnist is not installed (see README)")
def test_fashion_mnist_offline_end_to_end(tmp_path):
    import common

    train, val, meta = common.base_datasets("fashion-mnist", str(tmp_path))
    assert (len(train), len(val)) == (60000, 10000)
    assert meta == dict(size=28, channels=1, classes=10, stats=((0.286,), (0.353,)), folder=False)
    assert torch.bincount(train.tensors[1]).tolist() == [6000] * 10  # the published class balance
    # pixels parsed, not the header
    assert abs(train.tensors[0].float().mean().item() / 255 - 0.286) < 0.001
    out = str(tmp_path / "run")
    p = run("simclr.py", "--data", "fashion-mnist", "--subset", "512", "--arch", "resnet18",
            "--batch", "128", "--epochs", "1", "--workers", "0", "--knn-every", "0",
            "--lin-epochs", "20", "--lin-batch", "128", "--out-dir", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.fullmatch(r"linear top-1: \d+\.\d\d%", last_line(p.stdout))
    # well above chance (10%) over all 10,000 test images
    assert log_records(out)[-1]["linear_top1"] > 30


@pytest.mark.skipif(not os.path.isdir(FMNIST),
                    reason="Debian's dataset-fashion-mnist is not installed (see README)")
def test_eval_data_with_other_channels_is_refused_before_pretraining(tmp_path):
    out = tmp_path / "run"
    p = run("simclr.py", "--data", "synthetic", "--eval-data", "fashion-mnist", "--out-dir",
            str(out))
    assert_one_clear_line(p, "--eval-data fashion-mnist has 1 channel(s), --data synthetic 3")
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.skipif(not os.path.isdir(FMNIST),
                    reason="Debian's dataset-fashion-mnist is not installed (see README)")
def test_bench_mechanisms_runs_at_small_sizes(tmp_path):
    """`bench.py mechanisms` end to end at small sizes (the README's tables come from its default
    sizes): every table complete, q in [0, 1] with ordered percentiles, the pretrained
    backbone's q below the random one's at B 16, T 0.1 (SimCLR pulls the positives together),
    the toy objectives finite, SogCLR's errors for B 4 and 16; a missing --checkpoint ends with
    one line."""
    out = str(tmp_path / "mech.json")
    p = run("bench.py", "mechanisms", "--q-images", "512", "--pretrain-images", "512",
            "--pretrain-epochs", "2", "--toy-steps", "16", "--json", out)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.load(open(out))
    assert [(r["backbone"].split(" ")[0], r["temperature"]) for r in report["q"]] == [
        ("random", 0.1), ("random", 0.5), ("pretrained", 0.1), ("pretrained", 0.5)]
    for r in report["q"]:
        for b in ("16", "32", "64", "128", "256", "512"):
            mean, lo, hi = r[b]
            assert 0 <= lo <= mean <= hi <= 1, (r["backbone"], b, r[b])
    assert report["q"][2]["16"][0] < report["q"][0]["16"][0], report["q"]
    assert [r["method"] for r in report["toy"]] == [
        "SimCLR, random batches", "SimCLR, spectral batches", "DCL", "FlatNCE",
        "SogCLR, gamma 0.9", "SogCLR, gamma 0.1"]
    assert all(math.isfinite(x) for r in report["toy"] for b in ("2", "4", "8", "16") for x in r[b])
    assert [r["method"] for r in report["lr"]] == [r["method"] for r in report["toy"]
                                                   if r["method"] != "FlatNCE"]
    assert all(len(r) == 7
               and all(math.isfinite(x) for lr, c in r.items() if lr != "method" for x in c)
               for r in report["lr"])
    assert [(r["gamma"], r["batch"]) for r in report["estimator"]] == [
        (0.1, 4), (0.1, 16), (0.9, 4), (0.9, 16)]
    assert all(len(r["quarters"]) == 4 and min(min(w) for w in r["quarters"]) >= 0
               for r in report["estimator"])
    p = run("bench.py", "mechanisms", "--checkpoint", str(tmp_path / "missing.pt"))
    assert (p.returncode != 0
            and p.stderr.strip().startswith("error: --checkpoint ")), p.stderr[-3000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]


def test_bench_gpu_toy_runs_every_part_and_fails_soft(tmp_path):
    """`bench.py gpu --toy` on the CPU: every part ok in the JSON with positive rates; a missing
    Fashion-MNIST copy fails that part alone, with the fix named; --dry-run lists the parts
    within 8 minutes and runs nothing."""
    fmnist = next((d for d in (os.path.join(HERE, "data", "fashion-mnist"), FMNIST)
                   if os.path.isdir(d)), None)
    out, bad = str(tmp_path / "toy.json"), str(tmp_path / "no-fmnist")
    p = run("bench.py", "gpu", "--toy", "--json", out, "--fmnist-dir", fmnist or bad)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.load(open(out))
    assert report["hardware"]["device"] == "CPU" and report["hardware"]["cpus"] > 0
    parts = {x["name"]: x for x in report["parts"]}
    trains = ["train-" + m for m in ("simclr", "sogclr", "dcl", "flatnce", "polyview")]
    assert list(parts) == ["pipeline", "pipeline-fmnist", "loss", "spectral"] + trains
    for name, x in parts.items():
        assert x["status"] == "ok" or (name == "pipeline-fmnist" and not fmnist), (
            name, x["error"], x["traceback"])
    assert all(parts["pipeline"]["results"]["off"]["views_per_s"]["off"][k] > 0 for k in "abc")
    if fmnist:
        fm = parts["pipeline-fmnist"]["results"]["off"]
        assert fm["images"] == 60000 and all(fm["views_per_s"]["off"][k] > 0
                                             for k in ("a", "b", "c", "b_ref", "epoch_ratio"))
    row, = parts["loss"]["results"]["rows"]
    assert row["views"] == 512 and row["dense_ms"] > 0 and row["tiled_ms"] > 0
    assert (parts["spectral"]["results"]["seconds"] > 0
            and parts["spectral"]["results"]["batches"] == 2048 // 256)
    for name in trains:
        r = parts[name]["results"]
        assert (r["img_per_s"] > 0 and len(r["img_per_s_logged"]) == 2
                and 0 <= r["linear_top1"] <= 100), (name, r)
    assert "wrote " + out in p.stdout

    p = run("bench.py", "gpu", "--toy", "--parts", "pipeline-fmnist,spectral", "--fmnist-dir", bad,
            "--json", out)
    assert p.returncode == 0, p.stderr[-3000:]
    failed, spectral = json.load(open(out))["parts"]
    assert failed["status"] == "failed" and failed["results"] == {}, failed
    assert failed["error"].startswith("FileNotFoundError: no train-images-idx3-ubyte.gz in "
                                      + bad), failed["error"]
    assert "carry data/fashion-mnist" in failed["error"]
    assert spectral["status"] == "ok" and spectral["results"]["batches"] == 8

    dry = str(tmp_path / "dry.json")
    p = run("bench.py", "gpu", "--dry-run", "--json", dry)
    assert p.returncode == 0 and not os.path.exists(dry), p.stderr[-3000:]
    assert all(name in p.stdout for name in parts)
    assert int(re.search(r"total +(\d+) s", p.stdout).group(1)) < 480


if __name__ == "__main__":
    if sys.argv[1:] != ["--fix-copies"]:
        sys.exit("usage: python test_scripts.py --fix-copies   "
                 "(the tests run with python -m pytest)")
    fix_copies()
