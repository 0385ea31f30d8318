"""Data-parallel training: two real processes on CPU (gloo) through `accelerate launch`, and the shipped configs."""

import glob
import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from conftest import DDP_LAUNCH, ROOT, launch_training


def test_a_two_process_run_resumes_to_the_same_weights(ddp_run, tiny_policy, tiny_classifier, tmp_path):
    """Each process restores its own RNG state onto its own device ("cpu:0" on CPU); the evaluations of the first
    run change nothing of the training, so the resumed run may leave them out."""
    out, _ = ddp_run
    shutil.copytree(out / "checkpoint-1", tmp_path / "out" / "checkpoint-1")
    log = launch_training(DDP_LAUNCH, tiny_policy, tiny_classifier, tmp_path / "out", "--resume-from-checkpoint",
                          "auto")
    assert "resuming from" in log and "checkpoint-1 at step 1" in log
    resumed, straight = load_file(tmp_path / "out" / "final" / "model.safetensors"), load_file(
        out / "final" / "model.safetensors")
    assert resumed.keys() == straight.keys() and all((resumed[k] == straight[k]).all() for k in straight)


def test_each_process_trains_on_its_own_prompts(ddp_run):
    out, log = ddp_run
    assert "8 x 2 process(es) = 16 episodes" in log  # the effective batch is stated
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    for step in (1, 2):
        by_rank = {r: [s["query"] for s in samples if s["step"] == step and s["process"] == r] for r in (0, 1)}
        assert len(by_rank[0]) == len(by_rank[1]) == 8
        assert not set(by_rank[0]) & set(by_rank[1])
    stats = [json.loads(line) for line in open(out / "stats.jsonl")]
    assert [s["step"] for s in stats] == [0, 1, 2]  # logged once, by rank 0 (step 0: the evaluation before training)
    assert all("eval/toxicity" in s for s in stats) and (out / "training_curves.png").exists()


def test_weights_stay_identical_and_one_process_writes(ddp_run, tiny_policy):
    out, log = ddp_run
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
