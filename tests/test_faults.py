"""Faults through detoxify_ppo.py's real CLI, each asserting the exact state left behind: kill -9 at every point of
a save and of the log cut-back, SIGTERM during the final save, two runs into one folder, a disk that fills up."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import checkpoints
from conftest import ROOT, record_case, refusal, run_with_fault, tree_digest

SAMPLE_DATA = os.path.join(ROOT, "data", "real_toxicity_prompts_sample.jsonl")

# A fault is Python run in the training process first: it wraps one of checkpoints.py's functions.
KILL_BEFORE_SWAP = """
import os, signal, checkpoints
real = checkpoints.replace_folder
def replace_folder(new, path):  # the new folder is whole and fsynced, not yet in place
    if os.path.basename(path) == {name!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(new, path)
checkpoints.replace_folder = replace_folder
"""
KILL_DURING_LOG_CUT = """
import os, signal
real = os.replace
def replace(a, b):  # stats.jsonl is cut back already, samples.jsonl's cut copy is written and not yet renamed
    if str(a).endswith("samples.jsonl.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
os.replace = replace
"""
KILL_BETWEEN_RENAMES = """
import os, signal, checkpoints
checkpoints.exchange = lambda a, b: False  # a file system that cannot swap two folders in one step
real = os.replace
def replace(a, b):  # the old checkpoint-3 went to checkpoint-3.old; the new one is not in place yet
    real(a, b)
    if str(b).endswith("checkpoint-3.old"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
"""
SIGTERM_DURING_FINAL_SAVE = """
import os, signal, checkpoints
real = checkpoints.fsync_tree
def fsync_tree(folder):
    if str(folder).endswith("final.tmp"):
        os.kill(os.getpid(), signal.SIGTERM)
    real(folder)
checkpoints.fsync_tree = fsync_tree
"""


def train_args(policy, classifier, out, *extra):
    return ["--model", policy, "--reward-model", classifier, "--dataset", SAMPLE_DATA, "--steps", "4", "--save-every",
            "1", "--dtype", "float32", "--learning-rate", "1e-3", "--output-dir", out, *extra]


def train(fault, policy, classifier, out, *extra):
    return run_with_fault(fault, "detoxify_ppo.py", *train_args(policy, classifier, out, *extra))


def steps_logged(out, name="stats"):
    return [json.loads(line)["step"] for line in open(os.path.join(out, f"{name}.jsonl"))]


def same_weights(a, b):
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_policy, tiny_classifier):
    """An uninterrupted run, sent SIGTERM while it writes final/: the save finishes (the signal is only noted)."""
    out = str(tmp_path_factory.mktemp("reference") / "out")
    result = train(SIGTERM_DURING_FINAL_SAVE, tiny_policy, tiny_classifier, out)
    return out, result


def test_sigterm_during_the_final_save_lets_it_finish(reference):
    out, result = reference
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM came during the last step or the final save, which finished" in result.stdout
    assert sorted(n for n in os.listdir(out) if n.startswith(("checkpoint", "final"))) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3", "final"]
    assert json.load(open(os.path.join(out, "final", "trainer_state.json")))["step"] == 4
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))  # whole and loadable


def test_kill_9_at_each_point_of_saves_and_log_cut_back_then_resume_ends_as_uninterrupted(
        reference, tiny_policy, tiny_classifier, tmp_path):
    ref, _ = reference
    out = str(tmp_path / "out")

    # 1. killed with final.tmp whole but not in place: checkpoints 1-3 and the logs of all 4 steps stay
    result = train(KILL_BEFORE_SWAP.format(name="final"), tiny_policy, tiny_classifier, out)
    assert result.returncode == -signal.SIGKILL
    assert sorted(os.listdir(out)) == [".detox.lock", "checkpoint-1", "checkpoint-2", "checkpoint-3", "final.tmp",
                                       "heldout_prompts.jsonl", "samples.jsonl", "stats.jsonl", "training_args.json"]
    assert steps_logged(out) == [1, 2, 3, 4]

    # 2. resumed from checkpoint-2, killed in the log cut-back: final.tmp is tidied away, stats.jsonl is cut back to
    # step 2, samples.jsonl is left whole as it was (its cut copy was never renamed over it)
    samples_before = open(os.path.join(out, "samples.jsonl")).read()
    result = train(KILL_DURING_LOG_CUT, tiny_policy, tiny_classifier, out, "--resume-from-checkpoint",
                   os.path.join(out, "checkpoint-2"))
    assert result.returncode == -signal.SIGKILL
    assert "removed final.tmp (left by a save that was cut short)" in result.stdout
    assert not os.path.exists(os.path.join(out, "final.tmp"))
    assert steps_logged(out) == [1, 2]
    assert open(os.path.join(out, "samples.jsonl")).read() == samples_before

    # 3. resumed from checkpoint-2 again, on a file system that cannot swap folders: killed between moving the old
    # checkpoint-3 aside and putting the new one in place
    checkpoint_3 = tree_digest(os.path.join(out, "checkpoint-3"))
    result = train(KILL_BETWEEN_RENAMES, tiny_policy, tiny_classifier, out, "--resume-from-checkpoint",
                   os.path.join(out, "checkpoint-2"))
    assert result.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "checkpoint-3"))
    assert tree_digest(os.path.join(out, "checkpoint-3.old")) == checkpoint_3
    assert "pid" in open(os.path.join(out, ".detox.lock")).read()  # the killed run's lock file, left behind

    # 4. `auto` puts checkpoint-3 back, drops the half-saved copy, is not blocked by the dead run's lock file, resumes
    # from step 3 and ends exactly where the uninterrupted run ended, with the same logs
    result = train("", tiny_policy, tiny_classifier, out, "--resume-from-checkpoint", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "put checkpoint-3 back from checkpoint-3.old" in result.stdout
    assert "removed checkpoint-3.tmp" in result.stdout
    assert "resuming from" in result.stdout and "checkpoint-3 at step 3" in result.stdout
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".old"))]
    assert same_weights(os.path.join(out, "final"), os.path.join(ref, "final"))
    for name in ("stats", "samples"):
        assert steps_logged(out, name) == steps_logged(ref, name)
    assert ([json.loads(line)["env/reward_mean"] for line in open(os.path.join(out, "stats.jsonl"))] ==
            [json.loads(line)["env/reward_mean"] for line in open(os.path.join(ref, "stats.jsonl"))])


def test_a_second_training_into_a_busy_folder_is_refused_and_changes_nothing(tiny_policy, tiny_classifier, tmp_path):
    out = str(tmp_path / "out")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    first = subprocess.Popen([sys.executable, "detoxify_ppo.py", *train_args(tiny_policy, tiny_classifier, out)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = os.path.join(out, ".detox.lock")
    deadline = time.time() + 120
    while not (os.path.exists(lock) and f"pid {first.pid} " in open(lock).read()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # it keeps the folder, and cannot finish while the second one tries
    try:
        started = time.monotonic()
        second = subprocess.run([sys.executable, "detoxify_ppo.py", *train_args(tiny_policy, tiny_classifier, out),
                                 "--seed", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - started
    finally:
        os.kill(first.pid, signal.SIGCONT)
    line = refusal(second, seconds, f"--output-dir {out} is in use by training (pid {first.pid} ")
    assert first.poll() is None, "the first run ended before the second was refused: the test proves nothing"
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    intact = json.load(open(os.path.join(out, "training_args.json")))["seed"] == 0 and steps_logged(out) == [1, 2, 3, 4]
    record_case("second training into a folder in use", "detoxify_ppo.py", second.returncode, seconds, line, intact)
    assert intact


def test_a_full_disk_mid_run_stops_with_one_line_and_resumes_once_freed(reference, tiny_policy, tiny_classifier,
                                                                          tmp_path):
    """On a 560 kB tmpfs, checkpoint-1 fits and checkpoint-2 does not: one line, the run stops, checkpoint-1 stays
    whole and nothing half-written is left; with more room, `auto` resumes and ends as the uninterrupted run."""
    ref, _ = reference
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=560k", "tmpfs", str(disk)], capture_output=True)
    except FileNotFoundError:  # no mount(8) on this machine
        pytest.skip("cannot mount a tmpfs here: no mount command")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = str(disk / "out")
        started = time.monotonic()
        result = train("", tiny_policy, tiny_classifier, out)
        seconds = time.monotonic() - started
        line = refusal(result, 0, "cannot save", "checkpoint-2", "free some space, then run the same command with "
                       "--resume-from-checkpoint auto")  # after two steps of training: not held to REFUSE_WITHIN
        left = sorted(n for n in os.listdir(out) if n.startswith(("checkpoint", "final")))
        intact = left == ["checkpoint-1"] and json.load(open(os.path.join(out, "checkpoint-1",
                                                                          "trainer_state.json")))["step"] == 1
        record_case("disk full at the second checkpoint (560 kB tmpfs)", "detoxify_ppo.py", result.returncode,
                    seconds, line, intact)
        assert intact, left
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        result = train("", tiny_policy, tiny_classifier, out, "--resume-from-checkpoint", "auto")
        assert result.returncode == 0, result.stderr[-3000:]
        assert same_weights(os.path.join(out, "final"), os.path.join(ref, "final"))
        assert steps_logged(out) == [1, 2, 3, 4]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_overwrite_output_dir_removes_the_earlier_run_before_the_new_one_starts(reference, tiny_policy,
                                                                                tiny_classifier, tmp_path):
    """The earlier run's checkpoints can never be resumed by mistake: they are gone, and `auto` then finds only the
    new run's. Files that are not a run's stay."""
    ref, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "notes.txt").write_text("mine")
    result = train("", tiny_policy, tiny_classifier, str(out), "--overwrite-output-dir", "--steps", "2",
                   "--save-every", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("--overwrite-output-dir: removed the earlier run's checkpoint-1, checkpoint-2, checkpoint-3, final, "
            "stats.jsonl, samples.jsonl, training_args.json, heldout_prompts.jsonl") in result.stdout
    assert sorted(os.listdir(out)) == [".detox.lock", "final", "heldout_prompts.jsonl", "notes.txt", "samples.jsonl",
                                       "stats.jsonl", "training_args.json"]
    assert json.load(open(out / "final" / "trainer_state.json"))["step"] == 2
    assert steps_logged(str(out)) == [1, 2]


def test_a_finished_run_trains_further_from_final_with_a_larger_steps(reference, tiny_policy, tiny_classifier,
                                                                     tmp_path):
    """final/ is replaced in one swap (the exchange this machine's file system does), never missing, and the logs
    go on from step 4."""
    ref, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    result = train("", tiny_policy, tiny_classifier, str(out), "--resume-from-checkpoint", str(out / "final"),
                   "--steps", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(out / "final" / "trainer_state.json"))["step"] == 5
    assert steps_logged(str(out)) == [1, 2, 3, 4, 5]
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".old"))]


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "weights").write_text("new")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "weights").write_text("old")
    assert checkpoints.exchange(str(tmp_path / "new"), str(tmp_path / "final"))  # Linux, ext4/tmpfs/xfs/btrfs
    assert (tmp_path / "final" / "weights").read_text() == "new" and (tmp_path / "new" / "weights").read_text() == "old"
    checkpoints.replace_folder(str(tmp_path / "new"), str(tmp_path / "final"))  # swapped back, the other one gone
    assert os.listdir(tmp_path) == ["final"] and (tmp_path / "final" / "weights").read_text() == "old"
