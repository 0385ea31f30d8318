"""The benchmark cannot rot: its quick mode runs here (tiny model, CPU, seconds) and its JSON is checked for
structure and internal consistency, never for speed. Also: the random models have the real sizes, the proposed
frozen-prefix cache changes no number, storage sharing shows in the figures, and the GPU script's plan parses."""

import contextlib
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_ppo  # noqa: E402
import render  # noqa: E402

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
    assert set(ppo) == {"ours", "ours-opt", "study"}
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
    for loop in ("ours", "ours-opt"):
        assert ppo[loop]["speedup_vs_study"] == pytest.approx(
            ppo[loop]["episodes_per_second"] / ppo["study"]["episodes_per_second"])
    assert ppo["ours-opt"]["optimisations"] == [bench_ppo.OPT_PARTS[p] for p in ("head", "prefix", "logits", "adam",
                                                                                 "reward")]
    (ablation,) = [r for r in data["results"] if r.get("kind") == "optimize-ablation"]
    assert list(ablation["steps"]) == ["trl step", "+ frozen-prefix cache", "+ response-only logits", "+ fused Adam"]
    assert ablation["rounds"] == 1 and ablation["steps"]["trl step"]["paired_speedup_median"] == 1.0
    for t in ablation["steps"].values():
        assert len(t["seconds"]) == 1 and t["median"] == t["seconds"][0] > 0 and t["paired_speedup_median"] > 0
    (ev,) = [r for r in data["results"] if r.get("kind") == "eval"]
    assert ev["samples"] == 16 and ev["generate_seconds"] > 0 and ev["score_seconds"] > 0
    assert ev["seconds"] == pytest.approx(ev["generate_seconds"] + ev["score_seconds"])
    assert ev["samples_per_second"] == pytest.approx(16 / ev["seconds"])
    assert 0 < ev["generated_tokens"] <= 16 * 30
    assert "| tiny/shared=2,gc=off/ours |" in stdout and "samples/s" in stdout


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

    for name, expected in bench_ppo.REAL_PARAMETERS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(bench_ppo.policy_config(name))
        assert sum(p.numel() for p in model.parameters()) == expected, name
    gptj = bench_ppo.policy_config("gpt-j-6b")
    assert (gptj.n_embd, gptj.n_layer, gptj.n_head, gptj.rotary_dim, gptj.vocab_size) == (4096, 28, 16, 64, 50400)
    assert not gptj.tie_word_embeddings and gptj.eos_token_id == 50256
    reward = bench_ppo.reward_config("roberta-base")
    assert (reward.hidden_size, reward.num_hidden_layers, reward.num_attention_heads, reward.vocab_size,
            reward.max_position_embeddings, reward.pad_token_id) == (768, 12, 12, 50265, 514, 1)
    assert {int(k): v for k, v in reward.id2label.items()} == {0: "nothate", 1: "hate"}


def test_tokenizers_cover_every_id_and_truncate_like_the_classifier():
    tok = bench_ppo.policy_tokenizer(50400)  # gpt-j: 50257 + 143 extra ids
    assert len(tok) == 50400 and tok.eos_token_id == 50256 and tok.pad_token_id == 50256
    ids = [0, 17, 50255, 50257, 50399]
    assert tok(tok.decode(ids))["input_ids"] == ids
    assert tok.decode([5, 50256, 6], skip_special_tokens=True) == "w5 w6"
    reward_tok = bench_ppo.reward_tokenizer(50265, 512)
    enc = reward_tok(["w0 w1", " ".join(["w9"] * 600)], truncation=True, padding=True)
    assert enc["input_ids"][0][:4] == [0, 4, 5, 2] and enc["input_ids"][0][4] == 1  # <s> w0 w1 </s> <pad>
    assert len(enc["input_ids"][1]) == 512


def make_setup(opts, variant_text=""):
    config = bench_ppo.policy_config(opts.config)
    tokenizer = bench_ppo.policy_tokenizer(config.vocab_size)
    return bench_ppo.Setup(opts, config, tokenizer, "cpu", bench_ppo.parse_variant(variant_text, opts)), tokenizer


@pytest.mark.parametrize("config", ["tiny", "tiny-gptj"])  # gpt-neo blocks return tuples, gpt-j's tensors
def test_frozen_prefix_cache_gives_identical_updates_and_skips_the_frozen_blocks(tmp_path, config):
    """The proposed change: same parameters after a PPO step, bit for bit (float32), blocks 0..N-1 skipped."""
    torch.set_num_threads(1)
    opts = bench_ppo.parse_args(["--config", config, "--dtype", "float32"])
    opts.workdir = str(tmp_path)
    reward = (*bench_ppo.build_reward("tiny", "cpu"), 0)
    after, prefixes = [], []
    for use_cache in (False, True):
        setup, tokenizer = make_setup(opts)
        batch, lengths = bench_ppo.make_batch(np.random.default_rng(1), tokenizer, opts)
        responses = [torch.tensor(np.random.default_rng(2).integers(0, 500, size=n)) for n in lengths]
        scores = [torch.tensor(float(x)) for x in np.linspace(-2, 2, 16)]
        optimisations = bench_ppo.Optimisations(setup, "cpu", reward)
        calls = []  # runs of block 0's attention, in policy and reference: only a block that really runs calls it
        for model in (setup.trainer.model, setup.trainer.ref_model):
            bench_ppo.FrozenPrefixCache.blocks(model)[0].attn.register_forward_hook(lambda *a: calls.append(1))
        np.random.seed(0)
        optimisations.prefix.skip = use_cache  # the cache alone: bit-identical is the claim
        stats = setup.trainer.step(batch["input_ids"], responses, scores)
        after.append(({n: p.detach().clone() for n, p in setup.trainer.model.named_parameters()}, stats, len(calls)))
        prefixes.append(optimisations.prefix)
    (plain, plain_stats, plain_calls), (cached, cached_stats, cached_calls) = after
    assert plain_stats["ppo/loss/total"] == cached_stats["ppo/loss/total"]
    assert all(torch.equal(plain[n], cached[n]) for n in plain)
    assert any(not torch.equal(cached[n], p) for n, p in setup.trainer.ref_model.named_parameters()
               if n in cached)  # the step did change the policy
    # trl's step: 4 policy + 4 reference no-grad passes, then 4 epochs x 4 mini-batches = 24 forward calls;
    # with the cache only the policy's first 4 run the shared blocks
    assert (prefixes[1].misses, prefixes[1].hits) == (4, 20)
    assert prefixes[0].hits == prefixes[0].misses == 0 and plain_calls == 24 and cached_calls == 4


def step_with_and_without(tmp_path, config, seed, configure):
    """One trl step on the same fresh setup and batch, plain and with `configure(optimisations)` applied;
    returns [(parameters, stats, optimisations, lengths)] for the plain and the changed step."""
    torch.set_num_threads(1)
    opts = bench_ppo.parse_args(["--config", config, "--dtype", "float32"])
    opts.workdir = str(tmp_path)
    reward = (*bench_ppo.build_reward("tiny", "cpu"), 0)
    results = []
    for use in (False, True):
        setup, tokenizer = make_setup(opts)
        batch, lengths = bench_ppo.make_batch(np.random.default_rng(seed), tokenizer, opts)
        responses = [torch.arange(seed, seed + n) for n in lengths]
        optimisations = bench_ppo.Optimisations(setup, "cpu", reward)
        np.random.seed(0)
        with configure(optimisations) if use else contextlib.nullcontext():
            stats = setup.trainer.step(batch["input_ids"], responses,
                                       [torch.tensor(float(i % (seed + 1))) for i in range(16)])
        assert setup.trainer.optimizer is not optimisations.optimizer  # trl's optimizer is back afterwards
        params = {n: p.detach().clone() for n, p in setup.trainer.model.named_parameters()}
        results.append((params, stats, optimisations, lengths))
    return results


def test_all_proposed_changes_together_keep_the_update(tmp_path):
    """ours-opt's step (cache, fused Adam, contiguous head input) updates the policy as trl's plain step does."""
    (plain, *_), (changed, *_) = step_with_and_without(tmp_path, "tiny", 3, lambda o: o.enabled())
    for name, value in plain.items():
        torch.testing.assert_close(changed[name], value, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def response_only(optimisations):
    optimisations.prefix.response_only = True
    yield


@pytest.mark.parametrize("config", ["tiny", "tiny-gptj"])
def test_response_only_logits_compute_the_head_where_trl_reads_it(tmp_path, config):
    """The LM head runs on the response positions alone in the 20 calls after the first pass; same update."""
    (plain, plain_stats, _, _), (cut, cut_stats, opt, lengths) = step_with_and_without(tmp_path, config, 4,
                                                                                      response_only)
    assert opt.prefix.head_rows == 5 * int(sum(lengths))  # reference pass + 4 epochs over 16 rows, responses only
    for key in ("ppo/loss/total", "objective/kl", "objective/logprobs", "ppo/policy/entropy"):
        assert cut_stats[key] == pytest.approx(plain_stats[key], rel=1e-4, abs=1e-6), key
    for name, value in plain.items():
        torch.testing.assert_close(cut[name], value, rtol=1e-5, atol=1e-6)


def test_contiguous_head_hook_changes_no_sample():
    torch.set_num_threads(1)
    opts = bench_ppo.parse_args(["--config", "tiny"])
    opts.workdir = "unused"
    setup, tokenizer = make_setup(opts)
    batch, lengths = bench_ppo.make_batch(np.random.default_rng(0), tokenizer, opts)
    hook = bench_ppo.ContiguousLMHeadInput(setup.trainer.model)
    out = []
    for enabled in (False, True):
        hook.enabled = enabled
        torch.manual_seed(0)
        out.append(bench_ppo.detoxify_ppo.sample_responses(setup.trainer, tokenizer, batch["input_ids"], lengths))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_storage_sharing_shows_in_the_numbers(tmp_path):
    opts = bench_ppo.parse_args(["--config", "tiny"])
    opts.workdir = str(tmp_path)
    shared, _ = make_setup(opts)
    full, _ = make_setup(opts, "ref=trl")
    none, _ = make_setup(opts, "shared=0")
    assert shared.num_shared_layers == full.num_shared_layers == 2 and none.num_shared_layers == 0
    assert shared.trainable == full.trainable < none.trainable  # both freeze the first 2 blocks in the policy
    assert shared.reference_own == shared.trainable  # the reference's own copy: only what the policy trains
    value_head = bench_ppo.policy_config("tiny").hidden_size + 1
    assert full.reference_own == none.reference_own == full.parameters + value_head  # a whole copy
    assert shared.weights_bytes < full.weights_bytes == none.weights_bytes
    for setup in (shared, full, none):
        ref = setup.model_ref
        setup.close("cpu")
        assert ref() is None


def test_gpu_script_plan_parses_and_orders_the_headline_first():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")]).returncode == 0
    for dry, configs in (("0", ["gpt-neo-125m", "gpt-j-6b", "gpt-neo-2.7b", "gpt-j-6b"]), ("1", ["tiny"] * 4)):
        proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                              text=True, env=dict(os.environ, PLAN_ONLY="1", DRY_RUN=dry), timeout=30)
        assert proc.returncode == 0, proc.stderr
        plans = [shlex.split(line) for line in proc.stdout.splitlines()]
        assert [bench_ppo.parse_args(p).config for p in plans] == configs
        first = bench_ppo.parse_args(plans[0])
        assert first.baseline and first.opt and first.eval  # ours vs the study's loop comes first
        ladder = bench_ppo.parse_args(plans[1])
        variants = [bench_ppo.parse_variant(v, ladder) for v in ladder.variant]
        assert variants[0]["opt"] == 1 and bench_ppo.settings_of(variants[0]) == bench_ppo.DEFAULT_SETTINGS
        assert {"ref": "trl"}.items() <= variants[1].items()
        assert sorted({v["shared"] for v in variants if v["shared"] is not None}) == (
            [0, 14, 24] if dry == "0" else [0, 1, 3])
        assert sum(v["gc"] for v in variants) == 4
