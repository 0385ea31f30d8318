"""Tests of detoxify_ppo.py on tiny offline models and fixture rows in the real-toxicity-prompts schema."""

import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import detoxify_ppo
import make_tiny_models
from conftest import ROOT, run_cli
from detox_common import classifier_logits, load_classifier
from ppo_speedups import SPEEDUPS, SpeedupPPOTrainer, frozen_models_skip_ddp

SAMPLE_DATA = os.path.join(ROOT, "data", "real_toxicity_prompts_sample.jsonl")


def rtp_row(i, prompt, toxicity, continuation=" and then the garden was quiet again today."):
    scores = {"severe_toxicity": None, "profanity": 0.1, "insult": 0.2}
    return {"filename": f"f{i}", "begin": 0, "end": 1, "challenging": False,
            "prompt": {"text": prompt, "toxicity": toxicity, **scores},
            "continuation": {"text": continuation, "toxicity": 0.5, **scores}}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_filter_keeps_exactly_rows_above_threshold_and_drops_nulls(tmp_path):
    toxicities = [0.1, 0.3, 0.300001, None, 0.9, 0.29, None, 0.75]
    path = write_jsonl(tmp_path / "rows.jsonl", [rtp_row(i, f"prompt {i}", t) for i, t in enumerate(toxicities)])
    kept = detoxify_ppo.load_prompts(path, "train", 0.3)
    assert sorted(r["prompt"]["text"] for r in kept) == ["prompt 2", "prompt 4", "prompt 7"]
    kept = detoxify_ppo.load_prompts(path, "train", 0.8)
    assert [r["prompt"]["text"] for r in kept] == ["prompt 4"]


def test_queries_are_seeded_prefixes_of_prompt_then_continuation(tmp_path, tiny_policy, corpus):
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    rows = [rtp_row(i, p, 0.9, c) for i, (p, c, _) in enumerate(corpus[:64])]
    rows.append(rtp_row(99, "the cat", 0.9, " said that the teacher walks home the river is green today."))
    kept = detoxify_ppo.load_prompts(write_jsonl(tmp_path / "rows.jsonl", rows), "train", 0.3)
    queries = detoxify_ppo.build_queries(kept, tokenizer, 6, 9, seed=3)
    lengths = [len(q) for q in queries["input_ids"]]
    assert min(lengths) >= 6 and max(lengths) <= 9 and len(set(lengths)) > 1
    for row, query in zip(kept, queries):
        full = tokenizer(row["prompt"]["text"] + row["continuation"]["text"])["input_ids"]
        assert query["input_ids"].tolist() == full[: len(query["input_ids"])]
    # "the cat" is two tokens: the query runs on into the continuation.
    assert queries[len(rows) - 1]["query"].startswith("the cat said")
    again = detoxify_ppo.build_queries(kept, tokenizer, 6, 9, seed=3)
    assert [q.tolist() for q in again["input_ids"]] == [q.tolist() for q in queries["input_ids"]]
    other = detoxify_ppo.build_queries(kept, tokenizer, 6, 9, seed=0)
    assert [len(q) for q in other["input_ids"]] != lengths


def test_heldout_split_is_seeded_and_disjoint():
    kept = detoxify_ppo.load_prompts(SAMPLE_DATA, "train", 0.3)
    train, heldout = detoxify_ppo.split_prompts(kept, 0.25, seed=5, rows_needed=16)
    names = lambda rows: {r["filename"] for r in rows}  # noqa: E731
    assert not names(train) & names(heldout)
    assert len(train) + len(heldout) == len(kept) and len(heldout) == pytest.approx(0.25 * len(kept), abs=1)
    assert names(detoxify_ppo.split_prompts(kept, 0.25, seed=5, rows_needed=16)[1]) == names(heldout)
    assert names(detoxify_ppo.split_prompts(kept, 0.25, seed=6, rows_needed=16)[1]) != names(heldout)


def test_response_lengths_cover_min_to_max_inclusive_and_depend_on_step_and_process():
    lengths = [detoxify_ppo.response_lengths(step, 16, 20, 30, seed=0, process_index=0) for step in range(50)]
    assert min(map(min, lengths)) == 20 and max(map(max, lengths)) == 30
    again = detoxify_ppo.response_lengths(7, 16, 20, 30, seed=0, process_index=0)
    assert again.tolist() == lengths[7].tolist()
    assert detoxify_ppo.response_lengths(7, 16, 20, 30, seed=0, process_index=1).tolist() != again.tolist()


def tiny_base(layout, tokenizer, dtype=torch.float32, tiny_policy=None):
    """The tiny pretrained GPT-Neo fixture, or a random 4-block GPT-J (its blocks return tensors, its head is
    untied)."""
    from transformers import GPTJConfig

    torch.manual_seed(0)
    if layout == "gpt-neo":
        return AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=dtype)
    return AutoModelForCausalLM.from_config(GPTJConfig(
        vocab_size=len(tokenizer), n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_inner=64, n_positions=128,
        tie_word_embeddings=False), dtype=dtype)


def tiny_trainer(layout, tiny_policy, speedups=tuple(SPEEDUPS), trl_plain=False, dtype=torch.float32,
                 gradient_checkpointing=False, learning_rate=2.94e-5):
    """A policy with 2 of its 4 blocks shared, batch 16 / mini-batch 4, through build_models and SpeedupPPOTrainer;
    trl_plain: trl's own value-head model and PPOTrainer, nothing of ours but the shared reference."""
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    tokenizer.pad_token = tokenizer.eos_token
    base = tiny_base(layout, tokenizer, dtype, tiny_policy)
    config = PPOConfig(batch_size=16, mini_batch_size=4, learning_rate=learning_rate, seed=0,
                       gradient_checkpointing=gradient_checkpointing)
    if trl_plain:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base)
        return PPOTrainer(config, model, detoxify_ppo.create_shared_reference(model, 2), tokenizer), tokenizer
    model, ref = detoxify_ppo.build_models(base, 2)
    return SpeedupPPOTrainer(config, model, ref, tokenizer, 2, speedups), tokenizer


def one_step(trainer, tokenizer, seed=1, twin=False):
    """One trl step on a fixed random batch (queries 10-15, responses 20-30 tokens); parameters and stats after it.
    twin: row 1 holds row 0's tokens, split two tokens later into query and response."""
    rng = torch.Generator().manual_seed(seed)
    low, high = max(tokenizer.all_special_ids) + 1, len(tokenizer)  # no special token: no early stop
    queries = [torch.randint(low, high, (int(n),), generator=rng) for n in torch.randint(10, 16, (16,), generator=rng)]
    responses = [torch.randint(low, high, (int(n),), generator=rng)
                 for n in torch.randint(20, 31, (16,), generator=rng)]
    if twin:
        queries[1], responses[1] = torch.cat([queries[0], responses[0][:2]]), responses[0][2:]
    scores = [torch.tensor(x) for x in torch.linspace(-2, 2, 16).tolist()]
    np.random.seed(0)  # trl shuffles mini-batches with numpy
    stats = trainer.step(queries, responses, scores)
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, stats, sum(map(len, responses))


def count_calls(modules):
    """Runs of each module's forward (only a module that really runs calls it)."""
    calls = []
    for module in modules:
        module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def head_positions(trainer):
    """Positions the LM heads of policy and reference compute, call by call."""
    positions = []
    for model in (trainer.model, trainer.ref_model):
        model.pretrained_model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: positions.append(args[0].shape[:-1].numel()))
    return positions


def test_reference_shares_storage_of_frozen_blocks_and_stays_put_after_ppo_step(tiny_policy):
    trainer, tokenizer = tiny_trainer("gpt-neo", tiny_policy, dtype=torch.bfloat16, learning_rate=1e-2)
    policy = dict(trainer.model.named_parameters())
    reference = dict(trainer.ref_model.named_parameters())
    shared = [n for n in policy if ".wte." in n or ".wpe." in n or any(f".h.{i}." in n for i in range(2))]
    unshared = [n for n in policy if n not in shared]
    assert shared and any(".h.2." in n for n in unshared) and any("v_head" in n for n in unshared)
    for name in shared:
        assert policy[name].data_ptr() == reference[name].data_ptr(), name
        assert not policy[name].requires_grad
    for name in unshared:
        if name in reference:
            assert policy[name].data_ptr() != reference[name].data_ptr(), name
        assert policy[name].requires_grad
    assert not any(p.requires_grad for p in reference.values())
    # pure bfloat16 policy, and trl's value head in float32 (trl upcasts its input)
    assert {n: p.dtype for n, p in policy.items() if p.dtype != torch.bfloat16} == {
        "v_head.summary.weight": torch.float32, "v_head.summary.bias": torch.float32}
    # The optimiser holds only trainable parameters: shared blocks cost no optimiser state.
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(policy[n]) for n in unshared}

    before = {n: p.detach().clone() for n, p in policy.items()}
    ref_before = {n: p.detach().clone() for n, p in reference.items()}
    queries = [torch.tensor(tokenizer("the cat said that")["input_ids"]) for _ in range(16)]
    responses = [torch.tensor(tokenizer(" the garden is green.")["input_ids"]) for _ in range(16)]
    trainer.step(queries, responses, [torch.tensor(x) for x in torch.linspace(-2, 2, 16).tolist()])
    assert all(torch.equal(policy[n], before[n]) for n in shared)
    assert any(not torch.equal(policy[n], before[n]) for n in unshared)
    assert all(torch.equal(p, ref_before[n]) for n, p in reference.items())
    assert trainer.model.v_head.summary.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- speed-ups
@pytest.mark.parametrize("layout", ["gpt-neo", "gpt-j"])
def test_frozen_prefix_cache_gives_trls_update_bit_for_bit_and_runs_the_shared_blocks_once(tiny_policy, layout):
    results = []
    for trl_plain in (True, False):
        trainer, tokenizer = tiny_trainer(layout, tiny_policy, speedups=("prefix",), trl_plain=trl_plain)
        models = (trainer.model, trainer.ref_model)
        first = count_calls([m.pretrained_model.transformer.h[0].attn for m in models])
        unshared = count_calls([m.pretrained_model.transformer.h[2].attn for m in models])
        params, stats, _ = one_step(trainer, tokenizer)
        results.append((params, stats, len(first), len(unshared)))
    (plain, plain_stats, plain_first, plain_unshared), (cached, cached_stats, cached_first, cached_unshared) = results
    assert cached_stats["ppo/loss/total"] == plain_stats["ppo/loss/total"]
    assert np.array_equal(cached_stats["objective/logprobs"], plain_stats["objective/logprobs"])
    assert all(torch.equal(plain[n], cached[n]) for n in plain)
    # trl's step: 4 policy + 4 reference no-grad passes, then 4 epochs x 4 mini-batches = 24 forward calls;
    # with the cache the shared blocks run in the policy's first 4 only, the unshared ones in all 24
    assert (plain_first, plain_unshared) == (24, 24) and (cached_first, cached_unshared) == (4, 24)


@pytest.mark.parametrize("layout", ["gpt-neo", "gpt-j"])
def test_response_only_logits_compute_the_head_where_trl_reads_it(tiny_policy, layout):
    full, full_stats, _ = one_step(*tiny_trainer(layout, tiny_policy, trl_plain=True))
    trainer, tokenizer = tiny_trainer(layout, tiny_policy, speedups=("logits",))
    head_rows = head_positions(trainer)
    cut, cut_stats, response_tokens = one_step(trainer, tokenizer)
    # the policy's first pass over every position (16 rows), then the reference pass and 4 epochs over the 16
    # rows at the response positions only
    assert len(head_rows) == 24 and sum(head_rows[4:]) == 5 * response_tokens
    for key in ("ppo/loss/total", "objective/kl", "objective/logprobs", "ppo/policy/entropy"):
        assert cut_stats[key] == pytest.approx(full_stats[key], rel=1e-4, abs=1e-6), key
    for name, value in full.items():
        torch.testing.assert_close(cut[name], value, rtol=1e-5, atol=1e-6)


def test_rows_with_equal_tokens_but_another_split_read_their_own_positions(tiny_policy):
    """Rows are found by trl's tensors, not their tokens: row 1 holds row 0's tokens split two tokens later, and
    its logits are computed at its own response positions (two fewer than row 0's), giving trl's update."""
    full, _, _ = one_step(*tiny_trainer("gpt-neo", tiny_policy, trl_plain=True), twin=True)
    trainer, tokenizer = tiny_trainer("gpt-neo", tiny_policy)
    head_rows = head_positions(trainer)
    cut, _, response_tokens = one_step(trainer, tokenizer, twin=True)
    assert sum(head_rows[4:]) == 5 * response_tokens
    for name, value in full.items():
        torch.testing.assert_close(cut[name], value, rtol=1e-5, atol=1e-6)


def test_shipped_trainer_updates_the_policy_as_trls_plain_trainer(tiny_policy):
    """Fused Adam, the cache, response-only logits and the head hook together: trl's update, to float rounding."""
    plain, plain_stats, _ = one_step(*tiny_trainer("gpt-neo", tiny_policy, trl_plain=True))
    trainer, tokenizer = tiny_trainer("gpt-neo", tiny_policy)
    fast, fast_stats, _ = one_step(trainer, tokenizer)
    assert trainer.optimizer.optimizer.defaults["fused"] and trainer.speedups == set(SPEEDUPS)
    assert fast_stats["ppo/loss/total"] == pytest.approx(plain_stats["ppo/loss/total"], rel=1e-4)
    for name, value in plain.items():
        torch.testing.assert_close(fast[name], value, rtol=1e-5, atol=1e-6)


def test_speedups_switch_off_to_trls_plain_trainer_and_back(tiny_policy):
    """speedups_only() is trl's PPOTrainer as it is: the same update as trl's own trainer, bit for bit, with trl's
    unfused Adam and no head hook; afterwards every speed-up is back."""
    plain, plain_stats, _ = one_step(*tiny_trainer("gpt-neo", tiny_policy, trl_plain=True))
    trainer, tokenizer = tiny_trainer("gpt-neo", tiny_policy)
    head = trainer.model.pretrained_model.get_output_embeddings()
    with trainer.speedups_only():
        assert not trainer.speedups and not head._forward_pre_hooks
        assert not trainer.optimizer.optimizer.defaults["fused"]
        off, off_stats, _ = one_step(trainer, tokenizer)
    assert off_stats["ppo/loss/total"] == plain_stats["ppo/loss/total"]
    assert all(torch.equal(plain[n], off[n]) for n in plain)
    assert trainer.speedups == set(SPEEDUPS) and len(head._forward_pre_hooks) == 1
    assert trainer.optimizer.optimizer.defaults["fused"]


def test_gradient_checkpointing_checkpoints_the_trained_blocks_and_keeps_the_update(tiny_policy):
    """trl runs its passes in eval mode, where transformers would not checkpoint: the flag must still act."""
    plain, _, _ = one_step(*tiny_trainer("gpt-neo", tiny_policy))
    trainer, tokenizer = tiny_trainer("gpt-neo", tiny_policy, gradient_checkpointing=True)
    calls = []
    for layer in trainer.model.modules():
        if getattr(layer, "gradient_checkpointing", False):
            checkpoint = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _run=checkpoint, **k: calls.append(1) or _run(*a, **k)
    checkpointed, _, _ = one_step(trainer, tokenizer)
    assert len(calls) == 2 * 16  # the 2 trained blocks in each of the 4 epochs x 4 mini-batches; never without grad
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-6)


def test_contiguous_head_input_changes_no_sample(tiny_policy):
    trainer, tokenizer = tiny_trainer("gpt-neo", tiny_policy)
    queries = [torch.tensor(tokenizer(t)["input_ids"]) for t in ("the cat said that", "you are a", "we went to the")]
    samples = []
    for speedups in (SPEEDUPS, ()):
        with trainer.speedups_only(speedups):
            torch.manual_seed(0)
            samples.append(detoxify_ppo.sample_responses(trainer, tokenizer, queries, [25, 20, 30]))
    assert all(torch.equal(a, b) for a, b in zip(*samples))


def test_frozen_model_ddp_fix_applies_only_on_multi_cpu_runs(monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    seen = []  # accelerate's prepare_model, as the fix calls it: (model, evaluation_mode)
    monkeypatch.setattr(Accelerator, "prepare_model", lambda self, model, device_placement=None,
                        evaluation_mode=False: seen.append((model, evaluation_mode)))
    spy = Accelerator.prepare_model
    frozen, trainable = torch.nn.Linear(2, 2).requires_grad_(False), torch.nn.Linear(2, 2)
    with frozen_models_skip_ddp(DistributedType.NO):
        assert Accelerator.prepare_model is spy
    with frozen_models_skip_ddp(DistributedType.MULTI_CPU):
        Accelerator.prepare_model(None, frozen)
        Accelerator.prepare_model(None, trainable)
    assert seen == [(frozen, True), (trainable, False)] and Accelerator.prepare_model is spy


def test_help_says_what_turning_each_default_on_flag_off_does():
    result = run_cli("detoxify_ppo.py", "--help")
    text = " ".join(result.stdout.split())
    for name, help_text in detoxify_ppo.NO_FLAG_HELP.items():
        no_flag = f"--no-{name.replace('_', '-')}"
        assert f"{no_flag}, --no_{name} {help_text}" in text, no_flag
        positive = detoxify_ppo.Args.__dataclass_fields__[name].metadata["help"]
        assert help_text != positive


def test_default_shared_layers_follow_the_study_fraction():
    from transformers import GPTJConfig, GPTNeoConfig

    assert detoxify_ppo.resolve_shared_layers(None, GPTJConfig(n_layer=28)) == 20  # the study's GPT-J setting
    neo = GPTNeoConfig(num_layers=12, attention_types=[[["global", "local"], 6]])
    assert detoxify_ppo.resolve_shared_layers(None, neo) == 8
    assert detoxify_ppo.resolve_shared_layers(0, GPTJConfig(n_layer=28)) == 0


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_policy, tiny_classifier):
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_cli("detoxify_ppo.py", "--model", tiny_policy, "--reward-model", tiny_classifier,
                     "--dataset", SAMPLE_DATA, "--steps", "4", "--save-every", "2", "--output-dir", out,
                     "--log-with", "tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_cli_writes_checkpoints_that_reload_and_generate(cli_run, tiny_policy):
    out, result = cli_run
    assert "saved" in result.stdout + result.stderr
    for name in ("checkpoint-2", "final"):
        files = os.listdir(out / name)
        assert "model.safetensors" in files and "value_head.safetensors" in files
        assert not any(f.endswith(".bin") for f in files)  # weights only as safetensors; .pt/.pth is resume state
    assert not (out / "checkpoint-4").exists()  # the last step goes to final/
    assert json.load(open(out / "final" / "training_args.json"))["steps"] == 4
    model, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    prompt = tokenizer("the cat said that", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    # Training moved the unshared blocks and left the shared ones exactly as loaded.
    start = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.bfloat16).state_dict()
    trained = model.state_dict()
    assert all(torch.equal(trained[k], start[k]) for k in start if ".h.0." in k or ".h.1." in k)
    assert any(not torch.equal(trained[k], start[k]) for k in start if ".h.3." in k)


def test_tensorboard_shows_every_step_of_what_stats_jsonl_holds(cli_run):
    """README "Watching a run": tensorboard --logdir OUT/logs shows the same scalars, step by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = cli_run
    events = [os.path.join(d, f) for d, _, files in os.walk(out / "logs") for f in files if "tfevents" in f]
    assert events, list(os.walk(out / "logs"))
    accumulator = EventAccumulator(os.path.dirname(events[0])).Reload()
    scalars = accumulator.Tags()["scalars"]
    stats = [json.loads(line) for line in open(out / "stats.jsonl")]
    for tag in ("env/reward_mean", "objective/kl", "ppo/loss/total"):
        assert tag in scalars, scalars
        logged = accumulator.Scalars(tag)
        assert [e.step for e in logged] == [s["step"] for s in stats]
        assert [e.value for e in logged] == pytest.approx([s[tag] for s in stats], rel=1e-5)


def test_cli_logs_every_step_and_rewards_are_the_nothate_logit_of_the_response(cli_run, tiny_classifier):
    out, _ = cli_run
    stats = [json.loads(line) for line in open(out / "stats.jsonl")]
    assert [s["step"] for s in stats] == [1, 2, 3, 4]
    assert all({"objective/kl", "ppo/loss/total", "env/reward_mean", "time/generate"} <= s.keys() for s in stats)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 4 * 16
    tokenizer, model = load_classifier(tiny_classifier, "cpu", torch.bfloat16)  # --reward-dtype auto on CPU
    responses = [s["response"] for s in samples]
    # index 0 is "nothate"; scored step by step, the batches training scored, so equal to the last bit
    direct = torch.cat([classifier_logits(tokenizer, model, responses[i:i + 16])[:, 0] for i in range(0, 64, 16)])
    assert torch.equal(torch.tensor([s["reward"] for s in samples]), direct)
    with_prompt = classifier_logits(tokenizer, model, [s["query"] + s["response"] for s in samples])[:, 0]
    assert not torch.allclose(with_prompt, direct, atol=1e-2)  # the prompt is not part of what is scored
    policy_tokenizer = AutoTokenizer.from_pretrained(out / "final")
    lengths = [len(policy_tokenizer(s["response"])["input_ids"]) for s in samples]
    assert max(lengths) <= 30 and len(set(lengths)) > 1
    kept = detoxify_ppo.load_prompts(SAMPLE_DATA, "train", 0.3)
    heldout = [json.loads(line)["filename"] for line in open(out / "heldout_prompts.jsonl")]
    assert len(heldout) == len(set(heldout)) == math.ceil(0.2 * len(kept))  # datasets rounds the test share up


def test_gradient_checkpointing_still_trains_blocks_after_frozen_ones(tmp_path, tiny_policy, tiny_classifier):
    out = tmp_path / "out"
    detoxify_ppo.main(["--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset", SAMPLE_DATA,
                       "--steps", "1", "--output-dir", str(out), "--gradient-checkpointing", "--dtype", "float32"])
    start = AutoModelForCausalLM.from_pretrained(tiny_policy).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start if ".h.2." in k)
    assert all(torch.equal(trained[k], start[k]) for k in start if ".h.1." in k)


def test_ppo_halves_the_toxic_share_of_a_tiny_policy(tmp_path, tiny_policy, tiny_classifier):
    """Learning test: the policy says insults in about half its samples; PPO on the classifier's reward cuts that,
    on these prompts and on the held-out ones the run evaluates itself on (--eval-every)."""

    def toxic_share(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        torch.manual_seed(0)
        prompts = ["the cat said that my neighbour", "a driver thinks the teacher", "our team told me the bird",
                   "his sister claimed a driver"]
        texts = []
        for prompt in prompts:
            enc = tokenizer([prompt] * 64, return_tensors="pt")
            out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=20,
                                 pad_token_id=tokenizer.eos_token_id)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return sum(map(make_tiny_models.is_toxic_text, texts)) / len(texts)

    out = tmp_path / "out"
    result = run_cli("detoxify_ppo.py", "--model", tiny_policy, "--reward-model", tiny_classifier,
                     "--dataset", SAMPLE_DATA, "--steps", "30", "--learning-rate", "1e-3", "--dtype", "float32",
                     "--save-every", "0", "--output-dir", out, "--eval-every", "10")
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = toxic_share(tiny_policy), toxic_share(out / "final")
    print(f"toxic share before {before:.3f} after {after:.3f}")
    assert before > 0.3
    assert after <= before / 2
    evals = [s for s in map(json.loads, open(out / "stats.jsonl")) if "eval/toxicity" in s]
    curve = {s["step"]: s["eval/toxicity"] for s in evals}
    print(f"held-out toxicity by step {curve}")
    assert list(curve) == [0, 10, 20, 30] and curve[0] > 0.3
    assert curve[30] <= curve[0] / 2


# ---------------------------------------------------------------- PPO health

def test_a_healthy_run_counts_no_skipped_batch(cli_run):
    out, result = cli_run
    stats = [json.loads(line) for line in open(out / "stats.jsonl")]
    assert [s["ppo/minibatches"] for s in stats] == [4 * 16 // 4] * 4  # ppo_epochs x (batch / mini-batch)
    assert [s["ppo/skipped_batches"] for s in stats] == [0] * 4 and stats[-1]["ppo/skipped_batches_total"] == 0
    assert "PPO health: trl skipped 0 of 64 mini-batches" in result.stdout
    assert "warning:" not in result.stdout


def test_skipped_batches_are_counted_as_trl_skips_them(tmp_path, tiny_policy, tiny_classifier):
    """--ratio-threshold 0.5: every mini-batch's average ratio (about 1) is above it, so trl zeroes them all; the
    count matches what trl did (every loss zeroed), the running total adds up, and the run ends with a warning
    naming the fix."""
    out = tmp_path / "out"
    result = run_cli("detoxify_ppo.py", "--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset",
                     SAMPLE_DATA, "--steps", "2", "--ppo-epochs", "1", "--ratio-threshold", "0.5", "--save-every", "0",
                     "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = [json.loads(line) for line in open(out / "stats.jsonl")]
    assert [s["ppo/skipped_batches"] for s in stats] == [4, 4] and [s["ppo/minibatches"] for s in stats] == [4, 4]
    assert [s["ppo/skipped_batches_total"] for s in stats] == [4, 8]
    # trl did skip them all (zeroed losses), and said so once: Python shows a repeated warning only the first time,
    # which is why the count is needed
    assert all(s["ppo/loss/total"] == 0 for s in stats)
    assert result.stderr.count("Skipping batch") == 1
    lines = result.stdout.splitlines()
    assert "PPO health: trl skipped 8 of 8 mini-batches (average probability ratio above --ratio-threshold 0.5)" \
        in result.stdout
    assert any(line.startswith("warning: trl skipped 100% of the mini-batches") and "--learning-rate" in line
               for line in lines), result.stdout


def test_health_totals_continue_on_resume_and_flag_negative_kl():
    previous = [{"step": 1, "ppo/skipped_batches": 3, "ppo/minibatches": 16, "objective/kl": -0.5},
                {"step": 2, "ppo/skipped_batches": 0, "ppo/minibatches": 16, "objective/kl": -0.01}]  # noise
    health = detoxify_ppo.PPOHealth.from_stats(previous)
    assert health.update({"ppo/skipped_batches": 1, "ppo/minibatches": 16, "objective/kl": -0.2}) == {
        "ppo/skipped_batches_total": 4, "objective/negative_kl_steps": 2}
    summary, *warnings = health.report(10.0)
    assert summary.endswith("trl skipped 4 of 48 mini-batches (average probability ratio above --ratio-threshold "
                            "10); the mean KL was below -0.1 at 2 of 3 steps")
    assert len(warnings) == 1 and "negative at 67% of the steps" in warnings[0]  # 4/48 skipped is under 10%


# ---------------------------------------------------------------- evaluation during training

EVAL_KEYS = ["eval/toxicity", "eval/toxic_share", "eval/distinct_1", "eval/distinct_2", "eval/empty_share",
             "eval/ref_logprob"]


def read_stats(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_policy, tiny_classifier):
    """cli_run's options plus --eval-every 3: evaluations at steps 0, 3 and 4 (the last)."""
    out = tmp_path_factory.mktemp("eval-run") / "out"
    result = run_cli("detoxify_ppo.py", "--model", tiny_policy, "--reward-model", tiny_classifier,
                     "--dataset", SAMPLE_DATA, "--steps", "4", "--save-every", "2", "--output-dir", out,
                     "--log-with", "tensorboard", "--eval-every", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_eval_rows_appear_at_step_0_every_n_steps_and_the_last(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result = eval_run
    stats = read_stats(out / "stats.jsonl")
    assert [s["step"] for s in stats] == [0, 1, 2, 3, 4]
    before = stats[0]  # a line of its own: the policy as loaded, before any PPO step
    assert before["eval"] is True and "env/reward_mean" not in before and set(EVAL_KEYS) <= before.keys()
    assert [s["step"] for s in stats if "eval/toxicity" in s] == [0, 3, 4]
    assert not any(k.startswith("eval/") for s in stats if s["step"] in (1, 2) for k in s)
    for s in stats:
        if "eval/toxicity" in s:
            assert 0 < s["eval/toxicity"] < 1 and 0 <= s["eval/toxic_share"] <= 1 and s["eval/empty_share"] < 1
            assert 0 < s["eval/distinct_1"] <= s["eval/distinct_2"] <= 1 and s["eval/ref_logprob"] < 0
    assert all(not s.get("eval") for s in stats[1:]) and all("env/reward_mean" in s for s in stats[1:])
    events = [os.path.join(d, f) for d, _, files in os.walk(out / "logs") for f in files if "tfevents" in f]
    accumulator = EventAccumulator(os.path.dirname(events[0])).Reload()
    for key in EVAL_KEYS:
        logged = accumulator.Scalars(key)
        assert [e.step for e in logged] == [0, 3, 4], key
        assert [e.value for e in logged] == pytest.approx([s[key] for s in stats if key in s], rel=1e-5)
    assert [e.step for e in accumulator.Scalars("env/reward_mean")] == [1, 2, 3, 4]
    assert "evaluating 64 held-out prompts x 1" in result.stdout
    assert f"heldout_tox={stats[-1]['eval/toxicity']:.3f}" in result.stderr  # the progress bar's latest


def test_evaluating_changes_nothing_in_training(eval_run, cli_run):
    """The same run without --eval-every (cli_run) ends at exactly the same weights, through the same episodes."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "value_head.safetensors"):
        with_eval, without = (load_file(run[0] / "final" / name) for run in (eval_run, cli_run))
        assert with_eval.keys() == without.keys()
        assert all(torch.equal(with_eval[k], without[k]) for k in without), name
    assert open(eval_run[0] / "samples.jsonl").read() == open(cli_run[0] / "samples.jsonl").read()
    trained = [{k: v for k, v in s.items() if not k.startswith(("eval", "time/"))}
               for s in read_stats(eval_run[0] / "stats.jsonl")[1:]]
    assert trained == [{k: v for k, v in s.items() if not k.startswith("time/")}
                       for s in read_stats(cli_run[0] / "stats.jsonl")]


def test_eval_run_plots_its_curves_and_cards_them(eval_run):
    out, result = eval_run
    stats = read_stats(out / "stats.jsonl")
    png = open(out / "training_curves.png", "rb").read()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    card = open(out / "final" / "README.md").read()
    rows = [f"| {s['step']} | {s['eval/toxicity']:.4f} |" for s in stats if "eval/toxicity" in s]
    assert "## Held-out toxicity during training" in card and "\n".join(rows) in card
    early = open(out / "checkpoint-2" / "README.md").read()  # a checkpoint's card: the curve so far
    assert rows[0] in early and rows[1] not in early
    assert f"{stats[0]['eval/toxicity']:.3f} at step 0, {stats[-1]['eval/toxicity']:.3f} at step 4" in result.stdout


def test_a_resumed_eval_run_logs_and_ends_as_the_uninterrupted_one(eval_run, tmp_path, tiny_policy,
                                                                    tiny_classifier):
    """Resumed from checkpoint-2: stats.jsonl is cut back to steps 0-2 (the step-0 evaluation kept, not rerun),
    and the run ends with the uninterrupted run's weights, stats, curve, card and health totals."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(eval_run[0] / "checkpoint-2", out / "checkpoint-2")
    for name in ("stats.jsonl", "samples.jsonl"):
        shutil.copy(eval_run[0] / name, out / name)
    result = run_cli("detoxify_ppo.py", "--model", tiny_policy, "--reward-model", tiny_classifier,
                     "--dataset", SAMPLE_DATA, "--steps", "4", "--save-every", "2", "--output-dir", out,
                     "--eval-every", "3", "--resume-from-checkpoint", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    no_times = lambda path: [{k: v for k, v in s.items() if not k.startswith("time/")}  # noqa: E731
                             for s in read_stats(path)]
    assert no_times(out / "stats.jsonl") == no_times(eval_run[0] / "stats.jsonl")
    resumed, uninterrupted = (load_file(o / "final" / "model.safetensors") for o in (out, eval_run[0]))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    card = lambda o: open(o / "final" / "README.md").read().split("## Held-out")[1]  # noqa: E731
    assert card(out) == card(eval_run[0])
    assert "trl skipped 0 of 64 mini-batches" in result.stdout and (out / "training_curves.png").exists()


def test_evaluate_heldout_is_repeatable_and_leaves_rng_and_modes_as_they_were(tiny_policy, tiny_classifier):
    trainer, tokenizer = tiny_trainer("gpt-neo", tiny_policy)
    kept = detoxify_ppo.load_prompts(SAMPLE_DATA, "train", 0.3)
    queries = detoxify_ppo.choose_eval_queries(kept, 12, tokenizer, 10, 15, seed=0)
    assert len(queries) == 12
    again = detoxify_ppo.choose_eval_queries(kept, 12, tokenizer, 10, 15, seed=0)
    assert [q.tolist() for q in again["input_ids"]] == [q.tolist() for q in queries["input_ids"]]
    assert len(detoxify_ppo.choose_eval_queries(kept.select(range(5)), 12, tokenizer, 10, 15, seed=0)) == 5
    reward_tokenizer, reward_model = load_classifier(tiny_classifier, "cpu", torch.float32)
    toxicity_fn = lambda texts: detoxify_ppo.toxic_probability(reward_tokenizer, reward_model, 0, texts)  # noqa
    trainer.model.train()
    trainer.model.v_head.eval()  # a mixed state, to be restored as it was
    modes = [m.training for m in trainer.model.modules()]
    torch.manual_seed(123)
    np.random.seed(123)
    results = [detoxify_ppo.evaluate_heldout(trainer, tokenizer, queries, 2, 20, toxicity_fn, 8, seed=0)
               for _ in range(2)]
    after_torch, after_numpy = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(after_torch, torch.rand(3)) and np.array_equal(after_numpy, np.random.rand(3))
    assert [m.training for m in trainer.model.modules()] == modes
    for r in results:
        r.pop("time/eval")
    assert results[0] == results[1]
    # the toxicity is the classifier's "hate" probability (label 1 of the tiny one; the reward is label 0's logit)
    texts = ["you are a stupid idiot", "the garden is green"]
    probabilities = torch.softmax(classifier_logits(reward_tokenizer, reward_model, texts), -1)
    assert torch.equal(toxicity_fn(texts), probabilities[:, 1])


def test_response_logprobs_match_one_sequence_at_a_time(tiny_policy):
    """Padding (rows of other lengths in a batch) changes no row's log-probability."""
    model = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    pairs = [("the cat said that", " my neighbour is green"), ("you are a", " teacher"), ("we went", " home today")]
    queries = [torch.tensor(tokenizer(q)["input_ids"]) for q, _ in pairs]
    responses = [torch.tensor(tokenizer(r)["input_ids"]) for _, r in pairs]
    sums, counts = detoxify_ppo.response_logprobs(model, queries, responses, tokenizer.eos_token_id, batch_size=3)
    assert counts == [len(r) for r in responses]
    for q, r, total in zip(queries, responses, sums):
        ids = torch.cat([q, r])[None]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1], -1)
        expected = logprobs[torch.arange(len(q) - 1, ids.shape[1] - 1), r].sum().item()
        assert total == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- several reward classifiers

def test_reward_is_the_weighted_sum_of_each_classifiers_logit(tiny_classifier):
    tokenizer, model = load_classifier(tiny_classifier, "cpu", torch.float32)
    texts = ["the cat is kind.", "you stupid idiot", "the sun feels warm", ""]
    logits = classifier_logits(tokenizer, model, texts)
    one, terms = detoxify_ppo.score_responses([("c/nothate", tokenizer, model, 0, 1.0)], texts)
    assert torch.equal(one, logits[:, 0]) and torch.equal(terms["c/nothate"], logits[:, 0])  # the study's reward
    both, terms = detoxify_ppo.score_responses([("c/nothate", tokenizer, model, 0, 1.0),
                                                ("c/hate", tokenizer, model, 1, -0.5)], texts)
    assert torch.allclose(both, logits[:, 0] - 0.5 * logits[:, 1])
    assert set(terms) == {"c/nothate", "c/hate"} and torch.equal(terms["c/hate"], logits[:, 1])


def test_reward_terms_broadcast_one_label_or_weight():
    from detox_common import reward_terms

    assert reward_terms(["a", "b"], ["nothate"], [1.0]) == [("a", "nothate", 1.0), ("b", "nothate", 1.0)]
    assert reward_terms(["a", "b"], ["x", "y"], [1.0, 0.5]) == [("a", "x", 1.0), ("b", "y", 0.5)]
    with pytest.raises(SystemExit, match="one of each per classifier"):
        reward_terms(["a", "b"], ["x", "y", "z"], [1.0])
    args = detoxify_ppo.parse_args(["--reward-model", "x/clf", "y/clf"])
    with pytest.raises(SystemExit, match="same folder name and label"):
        detoxify_ppo.check_args(args)


def test_two_classifiers_train_log_each_term_and_card_them(tmp_path, tiny_policy, tiny_classifier):
    """Through the CLI: the classifier's nothate logit minus half its hate logit. Every episode's reward is that
    sum, each term is logged as env/reward/<name>/<label>, and the card names both."""
    out = tmp_path / "out"
    result = run_cli("detoxify_ppo.py", "--model", tiny_policy, "--reward-model", tiny_classifier, tiny_classifier,
                     "--reward-label", "nothate", "hate", "--reward-weight", "1", "-0.5", "--dataset", SAMPLE_DATA,
                     "--steps", "2", "--save-every", "0", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = [json.loads(line) for line in open(out / "stats.jsonl")]
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    tokenizer, model = load_classifier(tiny_classifier, "cpu", torch.bfloat16)  # --reward-dtype auto on CPU
    for step, line in zip((1, 2), stats):
        texts = [s["response"] for s in samples if s["step"] == step]
        logits = classifier_logits(tokenizer, model, texts).float()
        assert torch.allclose(torch.tensor([s["reward"] for s in samples if s["step"] == step]),
                              logits[:, 0] - 0.5 * logits[:, 1])
        assert line["env/reward/classifier/nothate"] == pytest.approx(float(logits[:, 0].mean()), rel=1e-5)
        assert line["env/reward/classifier/hate"] == pytest.approx(float(logits[:, 1].mean()), rel=1e-5)
    card = open(out / "final" / "README.md").read()
    assert f"1 x raw logit of `nothate` from `{tiny_classifier}` + -0.5 x raw logit of `hate` from " \
           f"`{tiny_classifier}`" in card
