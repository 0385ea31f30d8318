"""The benchmark cannot rot: its quick mode runs here (tiny model, CPU, seconds) and its JSON is checked for
structure and internal consistency, never for speed. Also: the random models have the real sizes, switching
the speed-ups off gives trl's own step, storage sharing shows in the figures, and the GPU script's plan parses."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench_ppo
import detoxify_ppo
import ppo_speedups
import random_models
import render
from conftest import ROOT

PHASES = ("generate", "reward", "optimize")


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_ppo.py"), "--quick",
                           "--threads", "1", "--json", str(path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(path) as f:
        return json.load(f), proc.stdout


def test_quick_mode_writes_consistent_results(quick_json):
    data, stdout = quick_json
    assert data["study"]["ppo_epochs"] == 100 and data["study"]["hours"] == 33
    (run,) = data["runs"]
    assert "--quick" in run["command"] and run["machine"]["device"] == "cpu" and run["machine"]["torch_threads"] == 1
    ppo = {r["loop"]: r for r in data["results"] if r.get("kind") == "ppo"}
    assert set(ppo) == {"ours", "ours-plain", "study"}
    for loop, r in ppo.items():
        assert "error" not in r
        assert r["config"] == "tiny" and r["device"] == "cpu" and r["dtype"] == "bfloat16"
        assert (r["batch_size"], r["mini_batch_size"], r["ppo_epochs"]) == (16, 4, 4)  # detoxify_ppo's defaults
        assert r["default_settings"] and r["num_shared_layers"] == 2 and r["reference"] == "shared storage"
        assert r["warmup_steps"] == 1 and r["measured_steps"] == len(r["steps"]) == 2 and not r["truncated"]
        for step in r["steps"]:
            assert all(step[p] > 0 for p in PHASES) and step["step"] > 0
            assert sum(step[p] for p in PHASES) <= step["step"] * (1 + 1e-3) + 1e-4  # phases are inside the step
            assert 16 <= step["tokens"] <= 16 * 30  # at most 30 new tokens per response (a sampled eos cuts one)
        median = r["median"]
        assert median["step"] in [s["step"] for s in r["steps"]]  # a real step, so its phases add up
        assert sorted(s["step"] for s in r["steps"])[0] == median["step"]  # lower median of two
        assert r["episodes_per_second"] == pytest.approx(16 / median["step"])
        assert r["generated_tokens_per_second"] == pytest.approx(r["median_tokens"] / median["step"])
        assert r["peak_memory_bytes"] > 0 and r["memory_kind"] == "process_peak_rss"
        assert r["freed"], "the policy was still referenced after its configuration was closed"
        assert r["parameters"] > r["trainable_parameters"] > 0
        if loop != "study":
            assert r["projection_all_rows"]["steps"] == (99_442 - 19_889) // 16
            assert r["projection_all_rows"]["hours"] == pytest.approx(4972 * median["step"] / 3600)
            assert set(r["median_optimize_split"]) >= {"forward_pass", "optimize_step"}
    for loop in ("ours", "ours-plain"):
        assert ppo[loop]["speedup_vs_study"] == pytest.approx(
            ppo[loop]["episodes_per_second"] / ppo["study"]["episodes_per_second"])
    assert ppo["ours"]["speedups"] == list(ppo_speedups.SPEEDUPS.values())  # all of them on, in the table's order
    assert ppo["ours-plain"]["speedups"] == ppo["study"]["speedups"] == []  # trl's PPOTrainer as it is
    assert ppo["ours"]["speedup_vs_plain"] == pytest.approx(
        ppo["ours"]["episodes_per_second"] / ppo["ours-plain"]["episodes_per_second"])
    (ablation,) = [r for r in data["results"] if r.get("kind") == "optimize-ablation"]
    assert list(ablation["steps"]) == ["trl step", "+ frozen-prefix cache", "+ response-only logits", "+ fused Adam"]
    assert ablation["rounds"] == 1
    for t in ablation["steps"].values():
        assert len(t["seconds"]) == 1 and t["median"] == t["seconds"][0] > 0 and t["paired_speedup_median"] > 0
    (ev,) = [r for r in data["results"] if r.get("kind") == "eval"]
    assert ev["samples"] == 16 and ev["generate_seconds"] > 0 and ev["score_seconds"] > 0
    assert ev["seconds"] == pytest.approx(ev["generate_seconds"] + ev["score_seconds"])
    assert ev["samples_per_second"] == pytest.approx(16 / ev["seconds"])
    assert 0 < ev["generated_tokens"] <= 16 * 30
    assert "| 0 | tiny | bfloat16, batch 16/4, 4 epochs, shared=2,gc=off | ours |" in stdout  # render's tables
    assert "trainer.step with" in stdout and "samples/s" in stdout


def test_render_makes_the_markdown_tables(quick_json, tmp_path):
    data, _ = quick_json
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    text = render.render([str(path)])
    for heading in ("PPO steps", "Memory and sharing", "Evaluation throughput", "Projected full default run"):
        assert heading in text
    ours = [line for line in text.splitlines() if line.startswith("| 0 | tiny | bfloat16") and "| ours |" in line]
    assert len(ours) == 1 and ours[0].split("|")[12].strip().endswith("x")  # the "vs study" column


def test_random_models_have_the_real_sizes():
    from transformers import AutoModelForCausalLM

    for name, expected in random_models.REAL_PARAMETERS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(random_models.policy_config(name))
        assert sum(p.numel() for p in model.parameters()) == expected, name
    gptj = random_models.policy_config("gpt-j-6b")
    assert (gptj.n_embd, gptj.n_layer, gptj.n_head, gptj.rotary_dim, gptj.vocab_size) == (4096, 28, 16, 64, 50400)
    assert not gptj.tie_word_embeddings and gptj.eos_token_id == 50256
    reward = random_models.reward_config("roberta-base")
    assert (reward.hidden_size, reward.num_hidden_layers, reward.num_attention_heads, reward.vocab_size,
            reward.max_position_embeddings, reward.pad_token_id) == (768, 12, 12, 50265, 514, 1)
    assert {int(k): v for k, v in reward.id2label.items()} == {0: "nothate", 1: "hate"}


def test_tokenizers_cover_every_id_and_truncate_like_the_classifier():
    tok = random_models.policy_tokenizer(50400)  # gpt-j: 50257 + 143 extra ids
    assert len(tok) == 50400 and tok.eos_token_id == 50256 and tok.pad_token_id == 50256
    ids = [0, 17, 50255, 50257, 50399]
    assert tok(tok.decode(ids))["input_ids"] == ids
    assert tok.decode([5, 50256, 6], skip_special_tokens=True) == "w5 w6"
    reward_tok = random_models.reward_tokenizer(50265, 512)
    enc = reward_tok(["w0 w1", " ".join(["w9"] * 600)], truncation=True, padding=True)
    assert enc["input_ids"][0][:4] == [0, 4, 5, 2] and enc["input_ids"][0][4] == 1  # <s> w0 w1 </s> <pad>
    assert len(enc["input_ids"][1]) == 512


def make_setup(argv, tmp_path, variant_text=""):
    args, opts = bench_ppo.parse_args(argv)
    args.output_dir = str(tmp_path)
    config = random_models.policy_config(opts.size)
    tokenizer = random_models.policy_tokenizer(config.vocab_size)
    return bench_ppo.Setup(args, opts, config, tokenizer, "cpu", bench_ppo.parse_variant(variant_text, args, opts)), \
        tokenizer


def count_calls(module):
    """A list that gets one entry per completed forward of `module`, and the hook's handle."""
    calls = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


def test_speedups_switch_off_to_trls_plain_step_and_back(tmp_path):
    """What the study's loop runs on the shared trainer, under trainer.speedups_only(), is trl's step as it is: the
    same update as a setup built without the speed-ups (float32, bit for bit), with every shared block run in
    every pass and trl's unfused Adam; and every speed-up is back on afterwards."""
    torch.set_num_threads(1)
    argv = ["--size", "tiny", "--dtype", "float32"]
    results = []
    for variant in ("plain=1", ""):
        setup, tokenizer = make_setup(argv, tmp_path, variant)
        batch, lengths = bench_ppo.make_batch(np.random.default_rng(1), tokenizer, setup.args)
        responses = [torch.arange(3, 3 + n) for n in lengths]
        scores = [torch.tensor(i / 4 - 2) for i in range(16)]
        policy = setup.trainer.accelerator.unwrap_model(setup.trainer.model)
        head = policy.pretrained_model.get_output_embeddings()
        calls, hook = count_calls(policy.pretrained_model.transformer.h[0])  # a shared (frozen) block
        np.random.seed(0)
        with setup.trainer.speedups_only():
            assert not setup.trainer.speedups and not head._forward_pre_hooks  # no head hook either
            optimizer = setup.trainer.optimizer
            stats = setup.trainer.step(batch["input_ids"], responses, scores)
        hook.remove()
        assert not optimizer.defaults.get("fused")  # trl's own Adam
        results.append(({n: p.detach().clone() for n, p in setup.trainer.model.named_parameters()}, stats, len(calls),
                        setup))
    (plain, plain_stats, plain_calls, plain_setup), (off, off_stats, off_calls, setup) = results
    assert plain_setup.trainer.available_speedups == frozenset()
    assert off_stats["ppo/loss/total"] == plain_stats["ppo/loss/total"]
    assert all(torch.equal(plain[n], off[n]) for n in plain)
    assert off_calls == plain_calls > 4  # the shared block ran in all of trl's passes, not from a cache
    # back on: all four speed-ups, fused Adam, the head hook once, and the frozen-prefix cache acts again
    assert setup.trainer.speedups == setup.trainer.available_speedups == frozenset(ppo_speedups.SPEEDUPS)
    assert setup.trainer.optimizer.defaults.get("fused") and setup.trainer.optimizer is not optimizer
    policy = setup.trainer.accelerator.unwrap_model(setup.trainer.model)
    assert len(policy.pretrained_model.get_output_embeddings()._forward_pre_hooks) == 1
    calls, hook = count_calls(policy.pretrained_model.transformer.h[0])
    setup.trainer.step(batch["input_ids"], responses, scores)
    hook.remove()
    assert 0 < len(calls) < off_calls  # only in the policy's first pass


def test_storage_sharing_shows_in_the_numbers(tmp_path):
    shared, _ = make_setup(["--size", "tiny"], tmp_path)
    full, _ = make_setup(["--size", "tiny"], tmp_path, "ref=trl")
    none, _ = make_setup(["--size", "tiny"], tmp_path, "shared=0")
    assert shared.num_shared_layers == full.num_shared_layers == 2 and none.num_shared_layers == 0
    assert shared.trainable == full.trainable < none.trainable  # both freeze the first 2 blocks in the policy
    assert shared.reference_own == shared.trainable  # the reference's own copy: only what the policy trains
    value_head = random_models.policy_config("tiny").hidden_size + 1
    assert full.reference_own == none.reference_own == full.parameters + value_head  # a whole copy
    assert shared.weights_bytes < full.weights_bytes == none.weights_bytes
    for setup in (shared, full, none):
        ref = setup.model_ref
        setup.close("cpu")
        assert ref() is None


def test_training_options_are_detoxify_ppos_own():
    args, opts = bench_ppo.parse_args(["--size", "tiny", "--batch-size", "8", "--mini-batch-size", "2",
                                       "--no-frozen-prefix-cache", "--steps", "5"])
    assert isinstance(args, detoxify_ppo.Args) and (args.batch_size, args.mini_batch_size, args.steps) == (8, 2, 5)
    assert not args.frozen_prefix_cache and args.response_only_logits and opts.size == "tiny"
    refusals = {}
    for argv in (["--config", "tiny"], ["--model", "EleutherAI/gpt-j-6B"], ["--size", "gpt-j-7b"]):
        with pytest.raises(SystemExit) as refused:
            bench_ppo.parse_args(argv)
        refusals[argv[0]] = str(refused.value)
    assert refusals["--config"].startswith("error: --config: not used by the benchmark")  # detoxify_ppo's YAML file
    assert "--model: not used by the benchmark" in refusals["--model"]
    assert "invalid choice: 'gpt-j-7b'" in refusals["--size"]


def test_gpu_script_plan_parses_and_orders_the_headline_first():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")]).returncode == 0
    for dry, configs in (("0", ["gpt-neo-125m", "gpt-j-6b", "gpt-neo-2.7b", "gpt-j-6b"]), ("1", ["tiny"] * 4)):
        proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                              text=True, env=dict(os.environ, PLAN_ONLY="1", DRY_RUN=dry), timeout=30)
        assert proc.returncode == 0, proc.stderr
        plans = [bench_ppo.parse_args(shlex.split(line)) for line in proc.stdout.splitlines()]
        assert [opts.size for _, opts in plans] == configs
        _, first = plans[0]
        assert first.baseline and first.plain and first.eval  # ours vs the study's loop comes first
        args, ladder = plans[1]
        variants = [bench_ppo.parse_variant(v, args, ladder) for v in ladder.variant]
        assert variants[0]["plain"] == 1 and bench_ppo.settings_of(variants[0]) == bench_ppo.DEFAULT_SETTINGS
        assert {"ref": "trl"}.items() <= variants[1].items()
        assert sorted({v["shared"] for v in variants if v["shared"] is not None}) == (
            [0, 14, 24] if dry == "0" else [0, 1, 3])
        assert sum(v["gc"] for v in variants) == 4
