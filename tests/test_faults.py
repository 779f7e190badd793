"""The fault suite: each test is a real `preflens train` process and a real fault (README, "What preflens
guarantees"). What is checked is what a user relies on: after the fault the run directory is intact, and
`--resume` ends where an uninterrupted run ends (the same parameters and the same metrics rows).

Runs use a tiny random Llama saved to a directory, a constant learning rate and every option written out,
so two runs of the same command give the same numbers. Slow: each test starts two or three processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from preflens.data.synthetic import sentiment_pairs

pytestmark = [pytest.mark.slow]

STEPS = 40
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny model, a data file, and the uninterrupted reference run of the suite's command."""
    from preflens.models import tiny_model

    root = tmp_path_factory.mktemp("faults")
    model, tok = tiny_model(hidden_size=32, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = sentiment_pairs(24, seed=0, response_length=4)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = root / "reference"
    res = _run(_cmd(root, ref))
    assert res.returncode == 0, res.stdout
    return root


def _cmd(root: Path, run: Path, *extra: str, steps: int = STEPS, save_every: int = 4) -> list[str]:
    return [sys.executable, "-m", "preflens.cli", "train", "--model", str(root / "model"), "--data",
            str(root / "pairs.jsonl"), "--output-dir", str(run), "--steps", str(steps), "--batch-size", "4",
            "--lr", "1e-3", "--scheduler", "constant", "--warmup-steps", "0", "--save-every", str(save_every),
            "--eval-every", "0", "--eval-fraction", "0", "--report-to", "none", "--no-progress", *extra]  # fmt: skip


def _run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["split"] == "train"]


def _wait_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        m = run / "metrics.jsonl"
        if m.is_file() and m.read_text().count('"split": "train"') >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {n} steps (exit {proc.poll()})")


def _same_as_reference(world: Path, run: Path) -> None:
    """Parameters of final/ and the train metrics rows equal the uninterrupted run's."""
    from safetensors.torch import load_file

    ref = world / "reference"
    a = load_file(ref / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    ra, rb = _train_rows(ref), _train_rows(run)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(1, STEPS + 1))
    for x, y in zip(ra, rb):
        for key in ("loss", "chosen_logp", "rejected_logp", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-6), (x["step"], key)


def _resume(world: Path, run: Path) -> subprocess.CompletedProcess:
    res = _run([sys.executable, "-m", "preflens.cli", "train", "--resume", "--output-dir", str(run)])
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_kill_9_during_a_step_then_resume_equals_an_uninterrupted_run(world, tmp_path):
    run = tmp_path / "run"
    proc = _start(_cmd(world, run))
    try:
        _wait_rows(run, 10, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists()
    _resume(world, run)
    _same_as_reference(world, run)


def test_kill_9_during_a_checkpoint_write_then_resume_equals_an_uninterrupted_run(world, tmp_path):
    """A checkpoint after every step, and the kill the moment a `.partial` directory is seen."""
    run = tmp_path / "run"
    proc = _start(_cmd(world, run, save_every=1))
    caught = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and caught is None:
            ck = run / "checkpoints"
            partial = sorted(ck.glob("step-*.partial")) if ck.is_dir() else []
            done = sorted(ck.glob("step-*[0-9]")) if ck.is_dir() else []
            if partial and len(done) >= 2:
                proc.send_signal(signal.SIGKILL)
                caught = partial[0]
            time.sleep(0.001)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert caught is not None, "no checkpoint write was seen in progress"
    assert proc.returncode == -signal.SIGKILL
    _resume(world, run)
    _same_as_reference(world, run)


def test_sigterm_checkpoints_and_resume_equals_an_uninterrupted_run(world, tmp_path):
    run = tmp_path / "run"
    proc = _start(_cmd(world, run))
    try:
        _wait_rows(run, 6, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    assert "continue with --resume" in out
    steps = [r["step"] for r in _train_rows(run)]
    assert (
        run / "checkpoints" / f"step-{steps[-1]}"
    ).is_dir()  # the last finished step, not the last --save-every
    _resume(world, run)
    _same_as_reference(world, run)


def test_two_trainings_into_one_output_dir(world, tmp_path):
    """The second refuses via the lock (even with --overwrite, which would delete the first's files);
    nothing of the first is damaged: it runs on, and its SIGTERM checkpoint resumes."""
    run = tmp_path / "run"
    first = _start(_cmd(world, run, steps=100000))
    try:
        _wait_rows(run, 3, first)
        before = sorted(p.name for p in run.iterdir())
        for extra in ((), ("--overwrite",), ("--resume",)):
            second = _run(_cmd(world, run, *extra))
            assert first.poll() is None, "the first run ended before the second was started"
            assert second.returncode == 2, second.stdout + second.stderr
            assert (
                "another preflens run is writing to it" in second.stderr and "Traceback" not in second.stderr
            )
            assert f"pid {first.pid}" in second.stderr
        assert set(before) <= {p.name for p in run.iterdir()}
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 143, out
    steps = [r["step"] for r in _train_rows(run)]
    assert steps == list(range(1, len(steps) + 1))
    # the lock went with the process: the run can be resumed
    res = _run(_cmd(world, run, "--resume", steps=steps[-1] + 2))
    assert res.returncode == 0, res.stdout + res.stderr
    assert [r["step"] for r in _train_rows(run)] == list(range(1, steps[-1] + 3))


def _mount_tmpfs(where: Path, *options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)], capture_output=True
    )
    return res.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_read_only_output_dir_is_a_one_line_error(world, tmp_path):
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, "ro", "size=1m"):
        try:
            for target in (ro, ro / "run"):
                res = _run(_cmd(world, target))
                assert res.returncode == 2, res.stdout + res.stderr
                assert "Traceback" not in res.stderr
                assert "read-only" in res.stderr or "cannot create the run directory" in res.stderr
        finally:
            _umount(ro)
        return
    if os.geteuid() == 0:
        pytest.skip("root ignores permissions and tmpfs cannot be mounted here")
    ro.mkdir()
    ro.chmod(0o555)
    res = _run(_cmd(world, ro / "run"))
    assert (
        res.returncode == 2
        and "cannot create the run directory" in res.stderr
        and "Traceback" not in res.stderr
    )


def test_disk_full_during_a_checkpoint(world, tmp_path):
    """A file system that fills up at a checkpoint: a one-line error naming the intact previous checkpoint,
    which --resume (once there is space) continues to the uninterrupted run's end.

    A small tmpfs where the machine allows mounting one; else a per-process file-size limit (RLIMIT_FSIZE)
    on a resumed run, whose next checkpoint then cannot be written."""
    small = tmp_path / "small"
    run = small / "run"
    if _mount_tmpfs(small, "size=3m"):  # config, reference, metrics and about two tiny checkpoints
        try:
            res = _run(_cmd(world, run, "--save-total-limit", "0", save_every=2))
            kept = tmp_path / "copy"
            shutil.copytree(run, kept)  # "free space": the run moves to a larger disk
        finally:
            _umount(small)
    else:
        import resource

        first = _run(_cmd(world, run, steps=8))
        assert first.returncode == 0, first.stdout + first.stderr
        size = (run / "checkpoints" / "step-8" / "model.safetensors").stat().st_size

        def limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

        res = _run(_cmd(world, run, "--resume"), preexec_fn=limit)
        kept = run
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()[-1]
    assert "writing the checkpoint failed" in err and "is intact" in err, err
    done = sorted(kept.glob("checkpoints/step-*"))
    assert done and not any(p.name.endswith(".partial") for p in done)
    _resume(world, kept)
    _same_as_reference(world, kept)


def test_corrupted_latest_checkpoint_falls_back_to_the_one_before(world, tmp_path):
    run = tmp_path / "run"
    res = _run(_cmd(world, run, "--save-total-limit", "0", steps=12))
    assert res.returncode == 0, res.stdout + res.stderr
    bad = run / "checkpoints" / "step-12" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated after the atomic rename (a disk error, a bad copy)
    res = _run(_cmd(world, run, "--resume"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "step-12: cannot be read" in res.stderr and "resuming from the checkpoint before it" in res.stderr
    assert "resumed from" in res.stdout + res.stderr and "step-8" in res.stdout + res.stderr
    _same_as_reference(world, run)


def test_inf_model_output_stops_before_the_bad_update_naming_the_pairs(world, tmp_path):
    """A model whose output goes inf on one word: the pairs using it get NaN log-probs; the run stops
    before their update, names them, and keeps the last good state."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preflens.data.collate import tokenize_pairs
    from preflens.data.formats import load_pairs

    tok = AutoTokenizer.from_pretrained(world / "model")
    model = AutoModelForCausalLM.from_pretrained(world / "model")
    pairs, _ = load_pairs(world / "pairs.jsonl")
    items, _ = tokenize_pairs(pairs, tok)
    uses: dict[int, set[int]] = {}
    for it in items:
        for t in set(it.chosen_ids) | set(it.rejected_ids):
            uses.setdefault(t, set()).add(it.pair_id)
    token, hit = min(
        ((t, p) for t, p in uses.items() if t != tok.eos_token_id), key=lambda x: (len(x[1]), x[0])
    )
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("inf")
    model.save_pretrained(tmp_path / "inf_model")
    tok.save_pretrained(tmp_path / "inf_model")
    cmd = _cmd(world, tmp_path / "run")
    cmd[cmd.index("--model") + 1] = str(tmp_path / "inf_model")
    res = _run(cmd)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    err = res.stderr
    assert "training stopped at step" in err and ("NaN" in err or "inf" in err)
    named = json.loads(err.split("pair(s) ")[1].split("]")[0] + "]")
    assert set(named) <= hit and named
    # no update from the bad step: any checkpoint left is finite
    for f in (tmp_path / "run").glob("checkpoints/step-*/model.safetensors"):
        assert all(torch.isfinite(w).all() for k, w in load_file(f).items() if "embed" not in k)
