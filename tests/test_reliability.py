"""Checkpoints, resume and faults of detoxify_ppo.py, through the real CLI where it matters."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import checkpoints
import detoxify_ppo
from conftest import ROOT

SAMPLE_DATA = os.path.join(ROOT, "data", "real_toxicity_prompts_sample.jsonl")
STEPS = "8"  # the SIGTERM run stops at step 2 or 3; more steps only cost time


def train_cmd(policy, classifier, out, *extra):
    return [sys.executable, os.path.join(ROOT, "detoxify_ppo.py"), "--model", policy, "--reward-model", classifier,
            "--dataset", SAMPLE_DATA, "--steps", STEPS, "--dtype", "float32", "--learning-rate", "1e-3",
            "--output-dir", str(out), *map(str, extra)]


def run(cmd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def digest(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_policy, tiny_classifier):
    out = tmp_path_factory.mktemp("a") / "out"
    result = run(train_cmd(tiny_policy, tiny_classifier, out, "--save-every", "1", "--save-total-limit", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_policy, tiny_classifier):
    """A real CLI run sent SIGTERM once two steps are logged; returns its output folder and stderr."""
    out = tmp_path_factory.mktemp("b") / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.Popen(train_cmd(tiny_policy, tiny_classifier, out, "--save-every", "0"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stats = out / "stats.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if stats.exists() and len(stats.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    return out, proc.returncode, stderr


def test_save_total_limit_keeps_the_newest_checkpoints(uninterrupted):
    names = sorted(n for n in os.listdir(uninterrupted) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-6", "checkpoint-7"]
    assert not [n for n in os.listdir(uninterrupted) if n.endswith((".tmp", ".old"))]
    state = json.load(open(uninterrupted / "checkpoint-7" / "trainer_state.json"))
    assert state["step"] == 7 and state["kl_coef"] > 0


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(interrupted):
    out, returncode, stderr = interrupted
    assert returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert "interrupted by SIGTERM at step" in last and "--resume-from-checkpoint" in last
    step = int(last.split(" at step ")[1].split("/")[0])
    assert 2 <= step < int(STEPS)
    assert (out / f"checkpoint-{step}").is_dir() and not (out / "final").exists()
    assert sorted(os.listdir(out / f"checkpoint-{step}")) == sorted(set(checkpoints.CHECKPOINT_FILES) | {
        "optimizer.pt", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"})
    assert len(read_jsonl(out / "stats.jsonl")) == step


def test_resumed_run_sees_the_same_batches_and_ends_with_the_same_weights(interrupted, uninterrupted,
                                                                          tiny_policy, tiny_classifier):
    """Tolerance: exact. Data order and response lengths are functions of (seed, step); the optimizer, KL
    coefficient and RNG states are restored bit for bit; float32 CPU kernels with the same thread count are
    deterministic. Any difference means state was lost."""
    out, _, stderr = interrupted
    resume_from = stderr.strip().splitlines()[-1].split("--resume-from-checkpoint ")[1]
    result = run(train_cmd(tiny_policy, tiny_classifier, out, "--save-every", "0",
                           "--resume-from-checkpoint", resume_from))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, straight = read_jsonl(out / "samples.jsonl"), read_jsonl(uninterrupted / "samples.jsonl")
    assert [(s["step"], s["query"]) for s in resumed] == [(s["step"], s["query"]) for s in straight]
    assert [s["response"] for s in resumed] == [s["response"] for s in straight]
    assert [s["step"] for s in read_jsonl(out / "stats.jsonl")] == list(range(1, int(STEPS) + 1))
    a, b = load_file(uninterrupted / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va = load_file(uninterrupted / "final" / "value_head.safetensors")
    vb = load_file(out / "final" / "value_head.safetensors")
    assert all(torch.equal(va[k], vb[k]) for k in va)


def test_resume_auto_picks_the_newest_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("checkpoint-6", "checkpoint-7"):
        shutil.copytree(uninterrupted / name, out / name)
    saved = json.load(open(out / "checkpoint-7" / "training_args.json"))
    data_order = {k: saved[k] for k in detoxify_ppo.DATA_ORDER_ARGS}
    resume = checkpoints.find_checkpoint("auto", str(out), use_peft=False, data_order=data_order,
                                         value_head_width=None)
    assert resume.path.endswith("checkpoint-7") and resume.step == 7 and resume.num_processes == 1
    assert resume.kl_coef == json.load(open(out / "checkpoint-7" / "trainer_state.json"))["kl_coef"]
    with pytest.raises(SystemExit, match=r"other --seed \(seed=0\)"):
        checkpoints.find_checkpoint("auto", str(out), use_peft=False, data_order={**data_order, "seed": 1},
                                    value_head_width=None)


def test_a_new_learning_rate_on_resume_is_used_from_the_first_resumed_step(interrupted, tiny_policy, tiny_classifier,
                                                                           tmp_path, capsys):
    source, _, stderr = interrupted
    step = int(stderr.strip().splitlines()[-1].split(" at step ")[1].split("/")[0])
    out = tmp_path / "out"
    detoxify_ppo.main(train_cmd(tiny_policy, tiny_classifier, out, "--resume-from-checkpoint",
                                source / f"checkpoint-{step}", "--steps", step + 1, "--learning-rate", "5e-4")[2:])
    assert "--learning-rate 0.0005 from here on (the checkpoint was trained at 0.001)" in capsys.readouterr().out
    (resumed,) = read_jsonl(out / "stats.jsonl")
    assert resumed["step"] == step + 1 and resumed["ppo/learning_rate"] == 5e-4
    assert json.load(open(out / "training_args.json"))["learning_rate"] == 5e-4


def test_nan_reward_stops_and_keeps_the_last_checkpoint(interrupted, tiny_policy, tiny_classifier, tmp_path):
    source, _, stderr = interrupted
    step = int(stderr.strip().splitlines()[-1].split(" at step ")[1].split("/")[0])
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(source / f"checkpoint-{step}", out / f"checkpoint-{step}")
    before = digest(out / f"checkpoint-{step}")
    broken = AutoModelForSequenceClassification.from_pretrained(tiny_classifier)
    with torch.no_grad():
        broken.classifier.out_proj.bias.fill_(float("nan"))  # an injected NaN: every reward is NaN
    broken.save_pretrained(tmp_path / "nan_classifier")
    shutil.copy(os.path.join(tiny_classifier, "tokenizer.json"), tmp_path / "nan_classifier")
    shutil.copy(os.path.join(tiny_classifier, "tokenizer_config.json"), tmp_path / "nan_classifier")
    result = run(train_cmd(tiny_policy, str(tmp_path / "nan_classifier"), out, "--save-every", "1",
                           "--resume-from-checkpoint", "auto"))
    assert result.returncode != 0
    assert f"non-finite reward at step {step + 1}" in result.stderr.strip().splitlines()[-1]
    assert digest(out / f"checkpoint-{step}") == before
    assert [n for n in os.listdir(out) if n.startswith(("checkpoint-", "final"))] == [f"checkpoint-{step}"]


def test_non_finite_log_probabilities_or_loss_stop_the_run():
    with pytest.raises(SystemExit, match="non-finite objective/logprobs at step 7"):
        detoxify_ppo.check_finite({"ppo/loss/total": 0.5, "objective/logprobs": [[0.1, float("nan")]]}, 7)
    with pytest.raises(SystemExit, match="non-finite ppo/loss/total at step 3"):
        detoxify_ppo.check_finite({"ppo/loss/total": float("inf")}, 3)
    detoxify_ppo.check_finite({"ppo/loss/total": 0.5, "objective/logprobs": [[0.1, -2.0]]}, 1)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tiny_policy, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import PPOConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    tokenizer.pad_token = tokenizer.eos_token
    model, ref = detoxify_ppo.build_models(AutoModelForCausalLM.from_pretrained(tiny_policy), 2)
    trainer = detoxify_ppo.build_ppo_trainer(PPOConfig(batch_size=16, mini_batch_size=4), model, ref, tokenizer, 2)
    path = str(tmp_path / "checkpoint-1")
    checkpoints.save_checkpoint(trainer, tokenizer, path, 1, {"seed": 0}, "card")
    assert json.load(open(os.path.join(path, "training_args.json"))) == {"seed": 0}
    before = digest(path)
    with torch.no_grad():
        model.v_head.summary.bias.fill_(3.0)

    real_save, written = torch.save, []

    def crash_at_optimizer(obj, target, *a, **k):  # dies halfway: other files are written, optimizer.pt is not
        if str(target).endswith("optimizer.pt"):
            written.extend(os.listdir(os.path.dirname(target)))
            raise OSError("disk full")
        return real_save(obj, target, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", crash_at_optimizer)
    with pytest.raises(SystemExit, match=r"cannot save .*checkpoint-1 \(OSError: disk full\); the checkpoints saved "
                                         "before are intact"):
        checkpoints.save_checkpoint(trainer, tokenizer, path, 1, {"seed": 0}, "card")
    assert "value_head.safetensors" in written  # the crash came after part of the new checkpoint was written
    assert digest(path) == before
    assert os.listdir(tmp_path) == ["checkpoint-1"]  # the half-written copy is gone


def test_too_little_free_disk_is_refused_before_models_load(tiny_policy, tiny_classifier, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(SystemExit, match=r"has 0.00 GB free but one checkpoint needs about"):
        detoxify_ppo.main(["--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset", SAMPLE_DATA,
                           "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # a refused run leaves no empty output folder behind


def test_nothing_non_finite_is_saved(tiny_policy, tmp_path):
    """Each part a checkpoint holds is checked before anything is written: a NaN weight, value head, optimizer
    moment or KL coefficient stops the save with one line naming it, and no folder (or .tmp) appears."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import PPOConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    tokenizer.pad_token = tokenizer.eos_token
    model, ref = detoxify_ppo.build_models(AutoModelForCausalLM.from_pretrained(tiny_policy), 2)
    trainer = detoxify_ppo.build_ppo_trainer(PPOConfig(batch_size=16, mini_batch_size=4), model, ref, tokenizer, 2)
    trainable = next(p for p in model.pretrained_model.parameters() if p.requires_grad)
    trainer.optimizer.state[trainable] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(trainable),
                                          "exp_avg_sq": torch.zeros_like(trainable)}
    path = str(tmp_path / "checkpoint-1")

    def refused(what):
        with pytest.raises(SystemExit) as stop:
            checkpoints.save_checkpoint(trainer, tokenizer, path, 1, {"seed": 0}, "card")
        assert str(stop.value).startswith("error: non-finite") and what in str(stop.value), stop.value
        assert os.listdir(tmp_path) == []

    with torch.no_grad():
        trainable[0].view(-1)[0] = float("nan")
        refused("policy weights at step 1")
        trainable[0].view(-1)[0] = 0.0
        model.v_head.summary.bias[0] = float("inf")
        refused("value head")
        model.v_head.summary.bias[0] = 0.0
    trainer.optimizer.state[trainable]["exp_avg_sq"][0] = float("nan")
    refused("optimizer state")
    trainer.optimizer.state[trainable]["exp_avg_sq"].zero_()
    trainer.kl_ctl.value = float("nan")
    refused("KL coefficient (nan)")
    trainer.kl_ctl.value = 0.2
    checkpoints.save_checkpoint(trainer, tokenizer, path, 1, {"seed": 0}, "card")  # all finite again: saved
    assert os.listdir(tmp_path) == ["checkpoint-1"]


def test_log_cut_back_drops_a_last_line_cut_short_and_names_any_other_bad_line(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "env/rew')
    assert checkpoints.cut_log(str(path), 2, keep_records=True) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and os.listdir(tmp_path) == ["stats.jsonl"]
    path.write_text('{"step": 1}\nedited by hand\n{"step": 2}\n')
    with pytest.raises(SystemExit, match=r"stats.jsonl line 2 is not a log line of detoxify_ppo.py"):
        checkpoints.cut_log(str(path), 2, keep_records=False)
    assert path.read_text() == '{"step": 1}\nedited by hand\n{"step": 2}\n'  # left as it was


def test_a_log_write_on_a_full_disk_is_one_line(tmp_path):
    os.symlink("/dev/full", tmp_path / "samples.jsonl")  # every write there fails with ENOSPC
    log = checkpoints.RunLog(str(tmp_path), None, enabled=True)
    with pytest.raises(SystemExit, match=r"cannot write the logs of step 1 \(No space left on device\); the "
                                         "checkpoints saved before are intact"):
        log.write(1, {"env/reward_mean": 0.5}, [{"step": 1, "query": "q", "response": "r"}])
    log.close()
