"""LoRA training, merged and adapter checkpoints, model cards, hub upload and YAML configs."""

import glob
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import detoxify_ppo
from conftest import ROOT, run_cli

SAMPLE_DATA = os.path.join(ROOT, "data", "real_toxicity_prompts_sample.jsonl")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_policy, tiny_classifier):
    out = tmp_path_factory.mktemp("lora") / "out"
    result = run_cli("detoxify_ppo.py", "--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset",
                     SAMPLE_DATA, "--steps", "3", "--save-every", "0", "--output-dir", out, "--use-peft",
                     "--lora-target-modules", "q_proj", "v_proj", "--merge-adapters", "--dtype", "float32",
                     "--learning-rate", "1e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def logits(model, tokenizer):
    ids = tokenizer(["the cat said that my neighbour thinks the bird"], return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_only_lora_and_value_head_train_and_the_reference_is_the_base(tiny_policy):
    from peft import LoraConfig

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model, ref = detoxify_ppo.build_models(detoxify_ppo.load_base_model(tiny_policy, torch.float32, "cpu"), 2, lora)
    assert ref is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("v_head") for n in trainable)
    assert any(n.startswith("v_head") for n in trainable) and any("lora_A" in n for n in trainable)
    with torch.no_grad():  # make the adapters matter, then check that disabling them gives the base back
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    base = AutoModelForCausalLM.from_pretrained(tiny_policy)
    with model.pretrained_model.disable_adapter():
        assert torch.allclose(logits(model.pretrained_model, tokenizer), logits(base, tokenizer), atol=1e-5)
    assert not torch.allclose(logits(model.pretrained_model, tokenizer), logits(base, tokenizer), atol=1e-3)


def test_adapter_and_merged_model_reload_and_differ_from_the_base(lora_run, tiny_policy):
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    base = AutoModelForCausalLM.from_pretrained(tiny_policy)
    base_logits = logits(base, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final-merged")
    assert not any("lora" in k for k in merged.state_dict())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_policy), lora_run / "final")
    merged_logits = logits(merged, tokenizer)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)
    assert torch.allclose(logits(adapted, tokenizer), merged_logits, atol=1e-4)
    assert os.path.getsize(lora_run / "final" / "adapter_model.safetensors") < os.path.getsize(
        os.path.join(tiny_policy, "model.safetensors"))


def test_model_card_describes_the_run_and_takes_the_evaluation(lora_run, tiny_policy, tiny_classifier):
    card = (lora_run / "final-merged" / "README.md").read_text()
    last = [json.loads(line) for line in open(lora_run / "stats.jsonl")][-1]
    for fact in (f"base_model: {tiny_policy}", SAMPLE_DATA, "prompt.toxicity > 0.3",
                 f"`nothate` from `{tiny_classifier}`", "learning rate 0.01", "batch 16, mini-batch 4",
                 "| steps | 3 |", "LoRA adapters (r=16",
                 f"mean reward {last['env/reward_mean']:.4f}, KL {last['objective/kl']:.4f}"):
        assert fact in card, fact
    result = run_cli("evaluate_toxicity.py", "--models", tiny_policy, lora_run / "final-merged", "--dataset",
                     os.path.join(ROOT, "data", "wiki_toxic_sample.csv"), "--toxicity-model", tiny_classifier,
                     "--num-samples", "4", "--max-new-tokens", "6", "--output-dir", lora_run / "eval",
                     "--update-model-card")
    assert result.returncode == 0, result.stderr[-3000:]
    card = (lora_run / "final-merged" / "README.md").read_text()
    table = (lora_run / "eval" / "toxicity.csv").read_text().splitlines()
    assert "Not evaluated yet" not in card and card.count("| model |") == 1
    mean = float(table[2].split(",")[table[0].split(",").index("mean_toxicity")])
    assert f"{mean:.4f}" in card and str(lora_run / "final-merged") in card
    assert not os.path.exists(os.path.join(tiny_policy, "README.md"))  # folders without a card are left alone


def test_push_to_hub_uploads_model_tokenizer_and_card(tiny_policy, tiny_classifier, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **k: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: calls.append(
        ("upload", k["repo_id"], sorted(os.listdir(k["folder_path"])), k["ignore_patterns"])))
    detoxify_ppo.main(["--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset", SAMPLE_DATA,
                       "--steps", "1", "--output-dir", str(tmp_path / "out"), "--push-to-hub", "someone/detoxed"])
    assert calls[0] == ("create", "someone/detoxed")
    _, repo, files, ignored = calls[1]
    assert repo == "someone/detoxed" and {"model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert "optimizer*.pt" in ignored  # optimizer.pt and DeepSpeed's optimizer_RANK.pt


def test_yaml_config_gives_defaults_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: some/model\nlearning_rate: 3.0e-6\nbatch-size: 32\nlora_target_modules: [q_proj]\n")
    args = detoxify_ppo.parse_args(["--config", str(path), "--batch-size", "8"])
    assert (args.model, args.learning_rate, args.batch_size, args.lora_target_modules) == (
        "some/model", 3e-6, 8, ["q_proj"])
    path.write_text("modle: typo\n")
    with pytest.raises(SystemExit, match="unknown options \\['modle'\\]"):
        detoxify_ppo.parse_args(["--config", str(path)])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "study_*.yaml"))),
                         ids=os.path.basename)
def test_study_configs_are_the_study_runs(path):
    args = detoxify_ppo.parse_args(["--config", path])
    models = {"study_gpt-neo-125m.yaml": "EleutherAI/gpt-neo-125M",
              "study_gpt-neo-2.7b.yaml": "EleutherAI/gpt-neo-2.7B", "study_gpt-j-6b.yaml": "EleutherAI/gpt-j-6B"}
    assert args.model == models[os.path.basename(path)]
    # the study's script: batch 16, mini-batch 4, learning rate (1.47e-5) * 2, the policy in bfloat16
    assert (args.batch_size, args.mini_batch_size, args.learning_rate, args.dtype) == (16, 4, 1.47e-5 * 2, "bfloat16")
