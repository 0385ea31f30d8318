"""Every bad input detoxify_ppo.py refuses, through the real CLI: non-zero exit, one `error:` line, no traceback,
refused in seconds, and an earlier run's files in the output folder left exactly as they were."""

import importlib.util
import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, record_case, refusal, run_cases, run_cli, timed_cli, tree_digest

SAMPLE_RTP = os.path.join(ROOT, "data", "real_toxicity_prompts_sample.jsonl")


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, tiny_policy, tiny_classifier):
    """A finished two-step training run: checkpoint-1 and final, the 'earlier output' no bad input may touch."""
    out = tmp_path_factory.mktemp("previous") / "out"
    result = run_cli("detoxify_ppo.py", "--model", tiny_policy, "--reward-model", tiny_classifier,
                     "--dataset", SAMPLE_RTP, "--steps", "2", "--save-every", "1", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def rows_file(folder, name, mutate):
    rows = [json.loads(line) for line in open(SAMPLE_RTP)][:64]
    for row in rows:
        mutate(row)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def broken_checkpoint(folder, name, damage):
    """A copy of the previous run's checkpoint-1, damaged; returns the copy's output folder."""
    out = os.path.join(folder, name)
    shutil.copytree(os.path.join(folder, "out", "checkpoint-1"), os.path.join(out, "checkpoint-1"))
    damage(os.path.join(out, "checkpoint-1"))
    return out


def rewrite_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    with open(path, "w") as f:
        json.dump({**data, **changes}, f)


def copied_checkpoint(folder, name):
    """A copy of the previous run's checkpoint-1 in another folder; returns the copy's path."""
    path = os.path.join(folder, name, "checkpoint-1")
    if not os.path.exists(path):
        shutil.copytree(os.path.join(folder, "out", "checkpoint-1"), path)
    return path


def wide_value_head(checkpoint):
    from safetensors.torch import save_file

    save_file({"summary.weight": torch.zeros(1, 7), "summary.bias": torch.zeros(1)},
              os.path.join(checkpoint, "value_head.safetensors"))


def bad_log_line(checkpoint):
    """A stats.jsonl beside the checkpoint whose first line was edited by hand."""
    with open(os.path.join(os.path.dirname(checkpoint), "stats.jsonl"), "w") as f:
        f.write("step 1: reward 0.5\n" + json.dumps({"step": 1}) + "\n")


def two_process_checkpoint(checkpoint):
    """What a 2-process run saves: trainer_state.json says so, and each process left its RNG state."""
    rewrite_json(os.path.join(checkpoint, "trainer_state.json"), num_processes=2)
    shutil.copy(os.path.join(checkpoint, "rng_state_0.pth"), os.path.join(checkpoint, "rng_state_1.pth"))


def text_file(folder, name, text):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def config_folder(folder, kind):
    """A folder holding only the config.json of a model of another kind: what the start-up checks read."""
    from transformers import GPTNeoConfig, RobertaConfig

    path = os.path.join(folder, kind)
    config = (RobertaConfig(architectures=["RobertaForSequenceClassification"]) if kind == "roberta-classifier"
              else GPTNeoConfig(architectures=["GPTNeoForCausalLM"]))
    config.save_pretrained(path)
    return path


# name: (extra arguments given the work folder w, expected piece of the message)
TRAIN_CASES = {
    "missing model": (lambda w: ["--model", f"{w}/no-such-model"], "model"),
    "missing reward model": (lambda w: ["--reward-model", f"{w}/no-such-classifier"], "reward model"),
    "missing dataset": (lambda w: ["--dataset", f"{w}/no-such-file.jsonl"], "dataset"),
    "dataset of unknown type": (lambda w: ["--dataset", shutil.copy(SAMPLE_RTP, f"{w}/rows.txt")], "is not one of"),
    "rows without prompt.text": (lambda w: ["--dataset", rows_file(w, "a.jsonl", lambda r: r["prompt"].pop("text"))],
                                 "prompt.text"),
    "rows without prompt.toxicity": (
        lambda w: ["--dataset", rows_file(w, "b.jsonl", lambda r: r["prompt"].pop("toxicity"))], "prompt.toxicity"),
    "rows without continuation": (lambda w: ["--dataset", rows_file(w, "c.jsonl", lambda r: r.pop("continuation"))],
                                  "'continuation'"),
    "too few kept rows": (lambda w: ["--toxicity-threshold", "0.99"], "one batch needs 16"),
    "batch not divisible": (lambda w: ["--batch-size", "10", "--mini-batch-size", "4"],
                            "multiple of --mini-batch-size"),
    "zero batch size": (lambda w: ["--batch-size", "0"], "--batch-size"),
    "shared layers >= blocks": (lambda w: ["--num-shared-layers", "4"], "below the model's block count (4)"),
    "negative shared layers": (lambda w: ["--num-shared-layers", "-1"], "--num-shared-layers must be >= 0"),
    "context min > max": (lambda w: ["--min-context-tokens", "9", "--max-context-tokens", "5"], "--min-context-tokens"),
    "new tokens min > max": (lambda w: ["--min-new-tokens", "31"], "--min-new-tokens"),
    "test fraction 1": (lambda w: ["--test-fraction", "1"], "--test-fraction"),
    "evaluation without held-out prompts": (lambda w: ["--eval-every", "2", "--test-fraction", "0"],
                                            "--test-fraction 0 holds none out"),
    "negative eval every": (lambda w: ["--eval-every", "-1"], "--eval-every must be >= 0"),
    "unknown dtype": (lambda w: ["--dtype", "int8"], "--dtype"),
    "unknown reward dtype": (lambda w: ["--reward-dtype", "half"], "--reward-dtype"),
    "unknown tracker": (lambda w: ["--log-with", "mlflow"], "--log-with"),
    **({"tracker not installed": (lambda w: ["--log-with", "wandb"], "needs the wandb package: pip install wandb")}
       if importlib.util.find_spec("wandb") is None else {}),  # not in requirements.txt
    "unknown reward label": (lambda w: ["--reward-label", "neutral"], "no label 'neutral'"),
    "output holds checkpoints": (lambda w: ["--output-dir", f"{w}/out"], "already holds checkpoints"),
    "output not writable": (lambda w: ["--output-dir", f"{w}/out/final/config.json/sub"], "not writable"),
    "resume from missing folder": (lambda w: ["--resume-from-checkpoint", f"{w}/out/checkpoint-9"], "no such folder"),
    "resume with missing optimizer": (
        lambda w: ["--resume-from-checkpoint", "auto", "--output-dir",
                   broken_checkpoint(w, "no-optimizer", lambda c: os.remove(os.path.join(c, "optimizer.pt")))],
        "incomplete: missing optimizer.pt"),
    "resume from truncated weights": (
        lambda w: ["--resume-from-checkpoint", "auto", "--output-dir",
                   broken_checkpoint(w, "truncated", lambda c: truncate(os.path.join(c, "model.safetensors")))],
        "is corrupt"),
    "resume with another process count": (
        lambda w: ["--resume-from-checkpoint", "auto", "--output-dir",
                   broken_checkpoint(w, "two-processes", two_process_checkpoint)],
        "trained with 2 process(es), this run has 1"),
    "resume with another seed": (lambda w: ["--resume-from-checkpoint", f"{w}/out/checkpoint-1", "--seed", "7"],
                                 "other --seed"),
    "8-bit loading on CPU": (lambda w: ["--use-peft", "--load-in-8bit"], "need a CUDA GPU"),
    "merge without LoRA": (lambda w: ["--merge-adapters"], "--merge-adapters needs --use-peft"),
    "config with unknown option": (lambda w: ["--config", text_file(w, "bad.yaml", "learning-rate: 1\nsteps_: 3\n")],
                                   "unknown options ['steps_']"),
    "resume of a finished run": (lambda w: ["--resume-from-checkpoint", f"{w}/out/final"], "nothing to do"),
    "classifier as the policy": (lambda w: ["--model", config_folder(w, "roberta-classifier")],
                                 "is a RobertaForSequenceClassification, not a causal LM"),
    "causal LM as the reward model": (lambda w: ["--reward-model", config_folder(w, "gpt-neo-lm")],
                                      "is a GPTNeoForCausalLM, not a sequence classifier"),
    "context and response past the positions": (lambda w: ["--max-context-tokens", "100"],
                                                "takes 128 positions, fewer than --max-context-tokens 100"),
    "infinite learning rate": (lambda w: ["--learning-rate", "inf"], "--learning-rate must be a finite number"),
    "negative seed": (lambda w: ["--seed", "-1"], "--seed must be in [0, 2**32)"),
    "zero reward batch size": (lambda w: ["--reward-batch-size", "0"], "--reward-batch-size must be >= 1"),
    "LoRA dropout 1": (lambda w: ["--use-peft", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    "target KL 0": (lambda w: ["--target-kl", "0"], "--target-kl must be a finite number above 0"),
    "negative KL coefficient": (lambda w: ["--init-kl-coef", "-1"], "--init-kl-coef must be a finite number >= 0"),
    "config given with =": (lambda w: [f"--config={text_file(w, 'eq.yaml', 'steps_: 3')}"],
                            "unknown options ['steps_']"),
    "more reward labels than classifiers": (lambda w: ["--reward-label", "nothate", "hate"],
                                            "give one --reward-label and one --reward-weight, or one of each"),
    "infinite reward weight": (lambda w: ["--reward-weight", "inf"], "--reward-weight must be finite"),
    "unknown option": (lambda w: ["--lr", "1e-5"], "unrecognized arguments: --lr 1e-5"),
    "text for a number": (lambda w: ["--steps", "three"], "argument --steps: invalid int value: 'three'"),
    "zero steps": (lambda w: ["--steps", "0"], "--steps and --ppo-epochs must be >= 1"),
    "zero checkpoints kept": (lambda w: ["--save-total-limit", "0"], "--save-total-limit must be >= 1"),
    "config value of the wrong type": (lambda w: ["--config", text_file(w, "type.yaml", "steps: three\n")],
                                       "type.yaml: argument --steps: invalid int value: 'three'"),
    "config list for a single value": (lambda w: ["--config", text_file(w, "list.yaml", "steps: [1, 2]\n")],
                                       "steps: [1, 2] is not a value --steps takes"),
    "config that is not a mapping": (lambda w: ["--config", text_file(w, "seq.yaml", "- steps\n")],
                                     "is not a mapping of option: value lines"),
    "model is a file": (lambda w: ["--model", f"{w}/out/final/config.json"], "is a file; give the folder"),
    "output folder is a file": (lambda w: ["--output-dir", f"{w}/out/training_args.json"], "not writable"),
    "empty dataset file": (lambda w: ["--dataset", text_file(w, "empty.jsonl", "")], "empty.jsonl is empty"),
    "malformed dataset line": (lambda w: ["--dataset", text_file(w, "cut.jsonl", open(SAMPLE_RTP).read()[:5000])],
                               "cut.jsonl line "),
    "toxicity given as text": (
        lambda w: ["--dataset", rows_file(w, "d.jsonl", lambda r: r["prompt"].update(toxicity="high"))],
        "row 1: prompt.toxicity 'high' is not a number"),
    "empty prompt text": (lambda w: ["--dataset", rows_file(w, "e.jsonl", lambda r: r["prompt"].update(text=" "))],
                          "prompt.text ' ' is not a text to continue"),
    "auto resume of a finished run": (lambda w: ["--resume-from-checkpoint", "auto", "--output-dir", f"{w}/out"],
                                      "already holds a finished run (final/)"),
    "earlier checkpoint of a finished run": (
        lambda w: ["--resume-from-checkpoint", f"{w}/out/checkpoint-1", "--output-dir", f"{w}/out"],
        "holds a finished run (final/): resuming from"),
    "checkpoint of another folder into a used one": (
        lambda w: ["--resume-from-checkpoint", copied_checkpoint(w, "elsewhere"), "--output-dir", f"{w}/out"],
        "is not in --output-dir"),
    "overwrite and resume the same run": (
        lambda w: ["--resume-from-checkpoint", "auto", "--overwrite-output-dir", "--output-dir", f"{w}/out"],
        "--overwrite-output-dir removes the earlier run"),
    "resume at --steps": (lambda w: ["--resume-from-checkpoint", f"{w}/out/checkpoint-1", "--steps", "1"],
                          "is at step 1, not below --steps 1; nothing to do"),
    "checkpoint without a KL coefficient": (
        lambda w: ["--resume-from-checkpoint", "auto", "--output-dir",
                   broken_checkpoint(w, "no-kl", lambda c: rewrite_json(os.path.join(c, "trainer_state.json"),
                                                                        kl_coef="0.2"))],
        "trainer_state.json has no valid 'kl_coef'"),
    "checkpoint optimizer cut short": (
        lambda w: ["--resume-from-checkpoint", "auto", "--output-dir",
                   broken_checkpoint(w, "cut-optimizer", lambda c: truncate(os.path.join(c, "optimizer.pt")))],
        "optimizer.pt is not a file torch.save wrote"),
    "checkpoint RNG state cut short": (
        lambda w: ["--resume-from-checkpoint", "auto", "--output-dir",
                   broken_checkpoint(w, "cut-rng", lambda c: truncate(os.path.join(c, "rng_state_0.pth")))],
        "rng_state_0.pth is not a file torch.save wrote"),
    "checkpoint of another model size": (
        lambda w: ["--resume-from-checkpoint", "auto", "--output-dir", broken_checkpoint(w, "wide", wide_value_head)],
        "its value head takes 7 inputs"),
    "log with a bad line": (
        lambda w: ["--resume-from-checkpoint", "auto", "--output-dir", broken_checkpoint(w, "bad-log", bad_log_line)],
        "stats.jsonl line 1 is not a log line of detoxify_ppo.py"),
}


@pytest.fixture(scope="module")
def refused(previous_run, tiny_policy, tiny_classifier):
    """Every case through the CLI, several at a time, each in a folder of its own holding a copy of the previous run
    (`w/out`): {case: (CompletedProcess, seconds, the copy's files unchanged)}."""
    def run_case(case):
        work = previous_run.parent / f"case-{list(TRAIN_CASES).index(case)}"
        shutil.copytree(previous_run, work / "out")
        before = tree_digest(work / "out")
        argv = ["--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset", SAMPLE_RTP, "--steps", "2",
                "--output-dir", work / "fresh"] + TRAIN_CASES[case][0](str(work))
        result, seconds = timed_cli("detoxify_ppo.py", *argv)
        return result, seconds, tree_digest(work / "out") == before

    return run_cases(run_case, TRAIN_CASES)


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_training_refuses_bad_input(case, refused):
    result, seconds, intact = refused[case]
    line = refusal(result, seconds, TRAIN_CASES[case][1])
    record_case(case, "detoxify_ppo.py", result.returncode, seconds, line, intact)
    assert intact
