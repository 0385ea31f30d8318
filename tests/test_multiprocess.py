"""Data-parallel training: two real processes on CPU (gloo) through `accelerate launch`, and the shipped configs."""

import glob
import json
import os
import shutil
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT, run_watched

SAMPLE_DATA = os.path.join(ROOT, "data", "real_toxicity_prompts_sample.jsonl")


def launch_two_processes(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    # --multi_gpu on a machine without GPUs starts two torchrun workers; the script makes them MULTI_CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           os.path.join(ROOT, "detoxify_ppo.py"), *map(str, args)]
    return run_watched(cmd, env, timeout=300)  # a run takes 20-30 s here


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_policy, tiny_classifier):
    out = tmp_path_factory.mktemp("ddp") / "out"
    result = launch_two_processes("--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset", SAMPLE_DATA,
                                  "--steps", "2", "--save-every", "1", "--output-dir", out, "--eval-every", "1",
                                  "--eval-prompts", "8")  # the held-out evaluation runs on rank 0 alone
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout + result.stderr


def test_a_two_process_run_resumes_to_the_same_weights(two_process_run, tiny_policy, tiny_classifier, tmp_path):
    """Each process restores its own RNG state onto its own device ("cpu:0" on CPU); the evaluations of the first
    run change nothing of the training, so the resumed run may leave them out."""
    out, _ = two_process_run
    shutil.copytree(out / "checkpoint-1", tmp_path / "out" / "checkpoint-1")
    result = launch_two_processes("--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset", SAMPLE_DATA,
                                  "--steps", "2", "--output-dir", tmp_path / "out", "--resume-from-checkpoint", "auto")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from" in result.stdout and "checkpoint-1 at step 1" in result.stdout
    resumed, straight = load_file(tmp_path / "out" / "final" / "model.safetensors"), load_file(
        out / "final" / "model.safetensors")
    assert resumed.keys() == straight.keys() and all((resumed[k] == straight[k]).all() for k in straight)


def test_each_process_trains_on_its_own_prompts(two_process_run):
    out, log = two_process_run
    assert "16 x 2 process(es) = 32 episodes" in log  # the effective batch is stated
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    for step in (1, 2):
        by_rank = {r: [s["query"] for s in samples if s["step"] == step and s["process"] == r] for r in (0, 1)}
        assert len(by_rank[0]) == len(by_rank[1]) == 16
        assert not set(by_rank[0]) & set(by_rank[1])
    stats = [json.loads(line) for line in open(out / "stats.jsonl")]
    assert [s["step"] for s in stats] == [0, 1, 2]  # logged once, by rank 0 (step 0: the evaluation before training)
    assert all("eval/toxicity" in s for s in stats) and (out / "training_curves.png").exists()


def test_weights_stay_identical_and_one_process_writes(two_process_run, tiny_policy):
    out, log = two_process_run
    assert log.count("trainable weights identical on all 2 processes") == 2  # checkpoint-1 and final
    assert log.count("saved ") == 1
    assert sorted(os.listdir(out / "checkpoint-1")).count("model.safetensors") == 1
    assert sorted(n for n in os.listdir(out) if n.startswith(("checkpoint", "final"))) == ["checkpoint-1", "final"]
    assert sorted(n for n in os.listdir(out / "checkpoint-1") if n.startswith("rng_state")) == [
        "rng_state_0.pth", "rng_state_1.pth"]
    trained = load_file(out / "final" / "model.safetensors")
    start = load_file(os.path.join(tiny_policy, "model.safetensors"))
    assert any(not (trained[k].float() == start[k].float()).all() for k in start if ".h.3." in k)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "accelerate", "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(path)
    assert config.num_machines == 1 and config.mixed_precision in ("no", "bf16")
