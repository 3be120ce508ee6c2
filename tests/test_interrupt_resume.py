"""Signals and kills: a conversion killed at any durable step (finalize and the final renames
included) resumes to byte-identical files; two runs into one output are kept apart by a lock;
Ctrl-C and OS errors keep the partial state."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from checkpoint_helpers import ROOT, SCHEMES, cli, default_sigint, files_bytes, quantize, reshard

from quantfw.errors import CheckpointError, OutputKeptError
from quantfw.integrations.hf import save_tiny_checkpoint
from quantfw.quantize import store


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing catches it and no later durable step happens."""


def _tiny(root, shards=2):
    src = reshard(
        save_tiny_checkpoint(
            "qwen3_moe", root / "one", hidden_size=128, moe_intermediate_size=64, num_experts=4, vocab_size=64
        ),
        root / "src",
        shards,
    )
    (src / "tokenizer.json").write_text('{"model": "tiny"}')
    (src / "generation_config.json").write_text('{"do_sample": false}')
    return src


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("kill"))


@pytest.fixture(scope="module")
def fresh(src, tmp_path_factory):
    return quantize(src, tmp_path_factory.mktemp("fresh") / "out", "clip")


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _count_steps(monkeypatch, run) -> int:
    n = [0]
    monkeypatch.setattr(store, "step", lambda: n.__setitem__(0, n[0] + 1))
    run()
    monkeypatch.undo()
    return n[0]


def _kill_from(monkeypatch, n):
    calls = [0]

    def step():
        calls[0] += 1
        if calls[0] >= n:
            raise Killed

    monkeypatch.setattr(store, "step", step)


@pytest.mark.parametrize("previous", [False, True], ids=["new", "overwrite"])
def test_killed_at_every_step_resumes_byte_identical(src, fresh, tmp_path, monkeypatch, previous):
    """previous: an older quantfw output (another scheme) is replaced with overwrite=true, so the
    move-aside and delete of the old output are among the steps."""

    older = quantize(src, tmp_path / "older", "w8a8") if previous else None

    def setup(out):
        if previous:
            shutil.copytree(older, out)

    probe = tmp_path / "probe"
    setup(probe)
    total = _count_steps(monkeypatch, lambda: quantize(src, probe, "clip", overwrite=previous))
    assert total >= 14 + 2 * previous  # marker, shards and records, files, metadata, journal, renames
    for n in range(1, total + 1):
        out = tmp_path / f"k{n}"
        setup(out)
        _kill_from(monkeypatch, n)
        with pytest.raises(Killed):
            quantize(src, out, "clip", overwrite=previous)
        monkeypatch.undo()
        if n < total:  # killed at the last step = after the run's last change
            assert _siblings(out), n  # something to resume from
            quantize(src, out, "clip", overwrite=previous)
        assert files_bytes(out) == files_bytes(fresh), f"killed at step {n} of {total}"
        assert _siblings(out) == [], n


def test_killed_between_metadata_files_resumes(src, fresh, tmp_path, monkeypatch):
    """Inside one metadata write (description written, config.json not yet)."""
    from quantfw.io.styles import msmodelslim as metadata  # the style that writes w8a8's files

    real = metadata.dump
    seen = []

    def dump(path, data):
        seen.append(path.name)
        if len(seen) == 2:
            raise Killed
        real(path, data)

    monkeypatch.setattr(metadata, "dump", dump)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        quantize(src, out, "w8a8")
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()
    ref = quantize(src, tmp_path / "ref", "w8a8")
    quantize(src, out, "w8a8")
    assert files_bytes(out) == files_bytes(ref)


def test_interrupted_commit_of_an_earlier_run_is_completed_first(src, fresh, tmp_path, monkeypatch, capsys):
    """Killed in the final renames of a clip run; a w8a8 run with overwrite=true first completes
    the clip output (a finished product), then replaces it."""
    total = _count_steps(monkeypatch, lambda: quantize(src, tmp_path / "probe", "clip"))
    out = tmp_path / "out"
    _kill_from(monkeypatch, total - 1)  # the partial folder is renamed, the journal not yet gone
    with pytest.raises(Killed):
        quantize(src, out, "clip")
    monkeypatch.undo()
    assert (tmp_path / ".out.commit.json").is_file() and files_bytes(out) == files_bytes(fresh)
    with pytest.raises(CheckpointError, match="not empty"):
        quantize(src, out, "w8a8")
    assert "earlier run" in capsys.readouterr().err and _siblings(out) == []
    ref = quantize(src, tmp_path / "ref", "w8a8")
    quantize(src, out, "w8a8", overwrite=True)
    assert files_bytes(out) == files_bytes(ref) and _siblings(out) == []


def test_output_below_missing_folders_and_a_planted_lock_symlink(src, fresh, tmp_path):
    out = quantize(src, tmp_path / "a" / "b" / "out", "clip")
    assert files_bytes(out) == files_bytes(fresh)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(OutputKeptError, match=".out.lock"):
        quantize(src, tmp_path / "out", "clip")
    assert victim.read_text() == "keep me"


def _cli_quantize(src, out, *extra, env=None):
    return cli("quantize", f"input={src}", f"output={out}", *SCHEMES["clip"], *extra, env=env)


@pytest.mark.parametrize(
    "before_end",
    # Each is two CLI subprocesses; the in-process test above covers every step.
    [8, 1] + [pytest.param(b, marks=pytest.mark.slow) for b in (-1, 2)],
    ids=lambda b: {8: "finalize", 1: "after-rename", -1: "first-shard", 2: "records-dropped"}[b],
)
def test_sigkill_of_a_real_process_resumes_byte_identical(src, fresh, tmp_path, monkeypatch, before_end):
    """A real SIGKILL (the QUANTFW_CRASH_AT hook) at the step `before_end` steps before the last."""
    total = _count_steps(monkeypatch, lambda: quantize(src, tmp_path / "probe", "clip"))
    for n in [2 if before_end < 0 else total - before_end]:
        out = tmp_path / f"k{n}"
        r = _cli_quantize(src, out, env={"QUANTFW_CRASH_AT": str(n)})
        assert r.returncode == -signal.SIGKILL, (n, r.returncode, r.stderr)
        lock = tmp_path / f".k{n}.lock"
        assert json.loads(lock.read_text())["pid"] > 0  # left by the dead process
        r = _cli_quantize(src, out)
        assert r.returncode == 0, r.stderr
        assert "no longer running; taking it over" in r.stderr
        assert files_bytes(out) == files_bytes(fresh), n
        assert _siblings(out) == [], n


def _hold_lock(lock_path):
    """A live process holding the output lock, as a running quantize would."""
    code = (
        "import sys, time; from pathlib import Path; from quantfw.quantize.store import OutputLock; "
        "OutputLock(Path(sys.argv[1])).acquire(print); print('held', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(lock_path), "--holder-marker"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_refused_while_the_first_holds_the_lock(src, tmp_path):
    out = tmp_path / "out"
    holder = _hold_lock(tmp_path / ".out.lock")
    try:
        with pytest.raises(CheckpointError) as e:
            quantize(src, out, "clip")
        msg = str(e.value)
        assert "\n" not in msg and "another quantize is writing this output" in msg
        assert f"pid {holder.pid} on {socket.gethostname()}" in msg and "--holder-marker" in msg
        assert not out.exists() and not (tmp_path / ".out.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    quantize(src, out, "clip")  # the kernel dropped the dead holder's flock
    assert _siblings(out) == []


def test_lock_of_a_dead_process_is_taken_over(src, fresh, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {
        "pid": dead.pid,
        "host": socket.gethostname(),
        "started": "yesterday",
        "command": "quantfw quantize",
    }
    (tmp_path / ".out.lock").write_text(json.dumps(stale))
    out = quantize(src, tmp_path / "out", "clip")
    err = capsys.readouterr().err
    assert f"pid {dead.pid}" in err and "taking it over" in err
    assert files_bytes(out) == files_bytes(fresh) and _siblings(out) == []


def test_in_process_second_converter_refused(src, tmp_path):
    """The lock is an flock of an open file: a second holder in the same process is refused too."""
    first = store.OutputLock(tmp_path / ".out.lock")
    first.acquire(print)
    try:
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
            quantize(src, tmp_path / "out", "clip")
    finally:
        first.release()
    assert not (tmp_path / ".out.lock").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.ENOTDIR])
def test_os_error_while_writing_keeps_the_partial_state(src, fresh, tmp_path, monkeypatch, code):
    real = store.write_atomic
    writes = []

    def failing(path, data):
        writes.append(path.name)
        if len(writes) == 3:  # the second shard
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    monkeypatch.setattr(store, "write_atomic", failing)
    out = tmp_path / "out"
    with pytest.raises(OutputKeptError) as e:
        quantize(src, out, "clip")
    msg = str(e.value)
    assert "\n" not in msg and writes[2] in msg and errno.errorcode[code] in msg and "resume" in msg
    partial = tmp_path / ".out.partial"
    assert partial.is_dir() and (partial / store.MARKER).is_file() and not out.exists()
    assert not (tmp_path / ".out.lock").exists()
    monkeypatch.undo()
    quantize(src, out, "clip")
    assert files_bytes(out) == files_bytes(fresh) and _siblings(out) == []


def test_os_error_in_finalize_keeps_the_partial_state(src, fresh, tmp_path, monkeypatch):
    real = store.ShardStore.copy_in

    def full(self, p):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp / p.name))

    monkeypatch.setattr(store.ShardStore, "copy_in", full)
    out = tmp_path / "out"
    with pytest.raises(OutputKeptError, match="ENOSPC"):
        quantize(src, out, "clip")
    assert (tmp_path / ".out.partial" / store.MARKER).is_file()
    monkeypatch.setattr(store.ShardStore, "copy_in", real)
    quantize(src, out, "clip")
    assert files_bytes(out) == files_bytes(fresh)


def test_keyboard_interrupt_keeps_the_partial_state(src, fresh, tmp_path, monkeypatch):
    real = store.ShardStore.write_record

    def interrupted(self, name, stamp, content, digest=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.ShardStore, "write_record", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantize(src, out, "clip")
    assert (tmp_path / ".out.partial" / store.MARKER).is_file() and not out.exists()
    monkeypatch.setattr(store.ShardStore, "write_record", real)
    quantize(src, out, "clip")
    assert files_bytes(out) == files_bytes(fresh)


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """Enough shards, each slow enough (the mse observer), that a signal sent after the first
    record lands mid-conversion."""
    root = tmp_path_factory.mktemp("sigint")
    src = reshard(save_tiny_checkpoint("qwen3_moe", root / "one", num_layers=6), root / "src", 12)
    return src, quantize(src, root / "fresh", "clip_mse")


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_to_a_real_process_keeps_resumable_state(bigger, tmp_path, sig):
    src, ref = bigger
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "quantfw", "quantize", f"input={src}", f"output={out}", *SCHEMES["clip_mse"]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    partial = tmp_path / ".out.partial"
    deadline = time.monotonic() + 120
    while not list(partial.glob("*.done.json")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    assert p.returncode != 0, err
    assert not out.exists() and (partial / store.MARKER).is_file()
    done = len(list(partial.glob("*.done.json")))
    assert 1 <= done < 12
    if sig == signal.SIGINT:
        _assert_one_interrupt_line(err)
    r = cli("quantize", f"input={src}", f"output={out}", *SCHEMES["clip_mse"])
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("already done (verified), skipped") == done
    assert files_bytes(out) == files_bytes(ref) and _siblings(out) == []


def _assert_one_interrupt_line(err):
    import inspect

    import quantfw.cli.main

    if "KeyboardInterrupt" not in inspect.getsource(quantfw.cli.main):
        return  # the CLI's one Ctrl-C line is quantfw/cli/main.py's (merged separately)
    assert "Traceback" not in err, err
    errors = [ln for ln in err.strip().splitlines() if "error" in ln.lower() or "interrupt" in ln.lower()]
    assert len(errors) == 1, err
