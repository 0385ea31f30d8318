"""Every bad input the scripts refuse, through the real CLI: non-zero exit, a one-line message, and the
output folder (holding an earlier run) left exactly as it was."""

import hashlib
import importlib.util
import json
import os
import shutil

import pytest

from conftest import ROOT, run_cli

SAMPLE_RTP = os.path.join(ROOT, "data", "real_toxicity_prompts_sample.jsonl")
SAMPLE_WIKI = os.path.join(ROOT, "data", "wiki_toxic_sample.csv")


def tree_digest(folder):
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


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
                   broken_checkpoint(w, "two-processes", lambda c: rewrite_json(os.path.join(c, "trainer_state.json"),
                                                                                num_processes=2))],
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
}


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_training_refuses_bad_input(case, previous_run, tiny_policy, tiny_classifier):
    make_args, message = TRAIN_CASES[case]
    work = str(previous_run.parent)
    before = tree_digest(previous_run)
    argv = ["--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset", SAMPLE_RTP, "--steps", "2",
            "--output-dir", f"{work}/fresh-{abs(hash(case))}"] + make_args(work)
    result = run_cli("detoxify_ppo.py", *argv)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert tree_digest(previous_run) == before


@pytest.fixture(scope="module")
def previous_results(tmp_path_factory):
    """An earlier evaluation's files, which no refused run may change."""
    out = tmp_path_factory.mktemp("results")
    (out / "toxicity.csv").write_text("model,n,mean_toxicity,std_toxicity,table_version\nearlier-model,4,0.25,0.1,2\n")
    (out / "toxicity.md").write_text("| model | n |\n|---|---|\n| earlier-model | 4 |\n")
    (out / "generations.jsonl").write_text(json.dumps({"model": "earlier-model", "generation": "x"}) + "\n")
    return out


def trained_on(folder, policy, classifier):
    """A copy of the policy whose training_args.json says it was trained with the classifier as reward."""
    model = os.path.join(folder, "trained-on-classifier")
    if not os.path.exists(model):
        shutil.copytree(policy, model)
        with open(os.path.join(model, "training_args.json"), "w") as f:
            json.dump({"reward_model": [classifier]}, f)
    return model


EVAL_CASES = {
    "missing model": (lambda w, p, c: ["--models", p, f"{w}/no-such-model"], "not found: no such folder"),
    "unknown hub model": (lambda w, p, c: ["--models", "nobody-x/no-such-model"],
                          "could not load model nobody-x/no-such-model"),
    "missing dataset": (lambda w, p, c: ["--dataset", f"{w}/no-such.csv"], "dataset"),
    "no comment_text": (lambda w, p, c: ["--dataset", text_file(w, "t.csv", "id,text,label\n1,a b,1\n")],
                        "need comment_text and label"),
    "too few toxic rows": (lambda w, p, c: ["--num-samples", "1000"], "fewer than --num-samples 1000"),
    "unknown toxic label": (lambda w, p, c: ["--toxic-label", "toxic"], "has no label 'toxic'"),
    "unknown extra label": (lambda w, p, c: ["--extra-toxicity-model", c], "has no label 'toxic'"),
    "num samples 0": (lambda w, p, c: ["--num-samples", "0"], "--num-samples must be at least 1"),
    "context too short": (lambda w, p, c: ["--max-new-tokens", "128"], "too few for --max-new-tokens 128"),
    "missing toxicity module": (lambda w, p, c: ["--toxicity-module", f"{w}/no-module"], "toxicity module"),
    "classifier as a model": (lambda w, p, c: ["--models", c],
                              "is a RobertaForSequenceClassification, not a causal LM"),
    "causal LM as the scorer": (lambda w, p, c: ["--toxicity-model", p], "is a GPTNeoForCausalLM, not a sequence"),
    "extra scorer the model was trained on": (
        lambda w, p, c: ["--models", trained_on(w, p, c), "--extra-toxicity-model", c, "--extra-toxic-label", "hate"],
        "is a reward classifier"),
    "earlier rows of unknown settings": (lambda w, p, c: [],
                                         "measured with other settings (--dataset: no record of it"),
}


@pytest.mark.parametrize("case", EVAL_CASES, ids=list(EVAL_CASES))
def test_evaluation_refuses_bad_input(case, previous_results, tiny_policy, tiny_classifier):
    make_args, message = EVAL_CASES[case]
    before = tree_digest(previous_results)
    argv = ["--models", tiny_policy, "--dataset", SAMPLE_WIKI, "--toxicity-model", tiny_classifier,
            "--num-samples", "4", "--output-dir", previous_results]
    argv += make_args(str(previous_results.parent), tiny_policy, tiny_classifier)
    result = run_cli("evaluate_toxicity.py", *argv)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert tree_digest(previous_results) == before
