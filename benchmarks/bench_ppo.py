#!/usr/bin/env python3
"""Time detoxify_ppo.py's PPO steps (and evaluate_toxicity.py's generation + scoring) against the study's loop.

Random-weight models at the real sizes of gpt-neo-125M, gpt-neo-2.7B and gpt-j-6B (or a tiny one), a
random-weight RoBERTa classifier of facebook/roberta-hate-speech-dynabench-r4-target's size as reward, all
built in memory on the target device and dtype: nothing is downloaded. Each measured step runs
detoxify_ppo.ppo_step (one batched generate, one classifier pass, trl's PPOTrainer.step), exactly what
detoxify_ppo.main runs per batch. With --baseline the study's loop (one ppo_trainer.generate per query, then
the same step) runs on the same trainer, interleaved step by step with ours, so both see the same load.

    python benchmarks/bench_ppo.py --config gpt-neo-125m --baseline --plain --eval
    python benchmarks/bench_ppo.py --config gpt-j-6b --variant plain=1 --variant ref=trl --variant shared=0,gc=1

--plain adds "ours-plain": batched generation on trl's PPOTrainer as it is, detoxify_ppo.build_ppo_trainer's
speed-ups off (fused Adam, frozen-prefix cache, response-only logits, contiguous head input), interleaved too.
    python benchmarks/bench_ppo.py --quick          # tiny model, seconds (what tests/test_benchmarks.py runs)

Prints a table and writes JSON (--json; --append adds to an existing file, rewritten after every result).
Reported per configuration: the median step (the measured step with the median total time, after warm-up)
split into generation, reward scoring and PPO optimisation; episodes/s = batch / median step seconds;
generated tokens/s = response tokens of that step / its seconds; peak memory (CUDA max allocated on GPU,
the process's RSS high-water mark on CPU).
"""

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import json
import math
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
import warnings
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")  # never the network: every model here is built in memory
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", message=r".*attention mask.*")  # the study's loop passes none, as it did
warnings.filterwarnings("ignore", message=r".*No dataset is provided.*")
warnings.filterwarnings("ignore", message=r".*pad_token_id.*")

import detoxify_ppo  # noqa: E402

# ---------------------------------------------------------------------------------------------- anchors
RTP_ROWS = 99_442  # allenai/real-toxicity-prompts, one split (REFERENCE.md)
STUDY = {"loop": "one ppo_trainer.generate per query, then ppo_trainer.step", "ppo_epochs": 100,
         "batch_size": 16, "mini_batch_size": 4, "hours": 33, "gpu": "one A100-80GB",
         "source": "public report of the study's GPT-J-6B script (REFERENCE.md)"}
STUDY_GEN_KWARGS = {"min_length": -1, "top_k": 0, "top_p": 1.0, "do_sample": True}  # the study's (top_k 0.0 there)

# Real sizes (REFERENCE.md); "tiny" is for tests and dry runs.
POLICIES = {
    "tiny": ("gpt_neo", dict(vocab_size=512, hidden_size=32, num_layers=4, num_heads=4,
                             attention_types=[[["global", "local"], 2]], window_size=16, intermediate_size=64,
                             max_position_embeddings=128)),
    "tiny-gptj": ("gptj", dict(vocab_size=512, n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_inner=64,
                               n_positions=128, tie_word_embeddings=False)),
    "gpt-neo-125m": ("gpt_neo", dict(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                                     attention_types=[[["global", "local"], 6]], window_size=256,
                                     intermediate_size=3072, max_position_embeddings=2048)),
    "gpt-neo-2.7b": ("gpt_neo", dict(vocab_size=50257, hidden_size=2560, num_layers=32, num_heads=20,
                                     attention_types=[[["global", "local"], 16]], window_size=256,
                                     intermediate_size=10240, max_position_embeddings=2048)),
    "gpt-j-6b": ("gptj", dict(vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_inner=16384,
                              n_positions=2048, tie_word_embeddings=False)),
}
REAL_PARAMETERS = {"gpt-neo-125m": 125_198_592, "gpt-neo-2.7b": 2_651_307_520, "gpt-j-6b": 6_050_882_784}
REWARDS = {
    "tiny": dict(vocab_size=516, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=66),
    "roberta-base": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514),
}
EOS = "<|endoftext|>"


def policy_config(name):
    from transformers import GPTJConfig, GPTNeoConfig

    kind, sizes = POLICIES[name]
    eos = min(50256, sizes["vocab_size"] - 1)
    common = dict(bos_token_id=eos, eos_token_id=eos, layer_norm_epsilon=1e-5)
    if kind == "gpt_neo":
        return GPTNeoConfig(**sizes, **common, activation_function="gelu_new", embed_dropout=0.0,
                            attention_dropout=0.0, resid_dropout=0.0)
    return GPTJConfig(**sizes, **common, activation_function="gelu_new", embd_pdrop=0.0, attn_pdrop=0.0,
                      resid_pdrop=0.0)


def reward_config(name):
    from transformers import RobertaConfig

    return RobertaConfig(**REWARDS[name], type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         layer_norm_eps=1e-5, id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1},
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


# ---------------------------------------------------------------------------------------------- tokenizers
def policy_tokenizer(vocab_size):
    """Word-level tokenizer covering every id of the policy: 'w0'..'w50255', eos '<|endoftext|>' at 50256
    (the GPT-2 id), GPT-J's 143 extra ids as '<|extratoken_k|>' (as its real tokenizer has). Built in a blink;
    a byte-level BPE of 50,257 merges would take minutes to train and change nothing that is timed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = min(50256, vocab_size - 1)
    vocab = {f"w{i}": i for i in range(eos)}
    vocab[EOS] = eos
    vocab.update({f"<|extratoken_{i - eos}|>": i for i in range(eos + 1, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                        model_max_length=2048)
    tokenizer.pad_token = tokenizer.eos_token  # as detoxify_ppo.main does for gpt-neo/gpt-j
    return tokenizer


def reward_tokenizer(vocab_size, max_length):
    """RoBERTa-style word-level tokenizer: <s>=0 <pad>=1 </s>=2 <unk>=3, then the policy's words, '<s> text </s>'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(vocab_size - 4)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length)


# ---------------------------------------------------------------------------------------------- helpers
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory(device):
    for _ in range(3):  # hooks and wrapped methods form cycles that can take more than one pass
        if not gc.collect():
            break
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def reset_peak_rss():
    """Start a new RSS high-water mark (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the mark is the process's, from its start


def peak_rss_bytes():
    """RSS high-water mark since the last reset_peak_rss (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def unique_bytes(*modules):
    """Bytes of distinct parameter storages across modules: shared storage counts once."""
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            key = (p.device, p.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return total


def machine_info(device):
    import transformers
    import trl

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "nice": os.nice(0), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def median_index(values):
    """Index of the lower median: a real step, so its phase split adds up."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    return order[(len(order) - 1) // 2]


def projected_hours(step_seconds, batch_size, kept_rows, test_fraction=0.2):
    """Hours of detoxify_ppo's default run: one pass over the training rows (kept rows less the held-out share)."""
    heldout = math.ceil(test_fraction * kept_rows) if test_fraction > 0 else 0
    steps = (kept_rows - heldout) // batch_size
    return steps, steps * step_seconds / 3600


# ---------------------------------------------------------------------------------------------- models
def build_reward(name, device):
    """Random-weight RoBERTa classifier in detoxify_ppo's reward dtype: float16 on GPU, bfloat16 on CPU (one model
    for every loop: the study's own script ran it in float16)."""
    from transformers import RobertaForSequenceClassification

    config = reward_config(name)
    dtype = detoxify_ppo.reward_dtype(detoxify_ppo.Args(), torch.device(device))
    with torch.device(device):
        model = RobertaForSequenceClassification._from_config(config, dtype=dtype).eval()
    return reward_tokenizer(config.vocab_size, config.max_position_embeddings - 2), model


def build_policy(config, device, dtype, attn_implementation=None):
    """Random-weight causal LM built directly on the device in its dtype (fast even for 6B parameters)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)


class Setup:
    """Policy with value head, reference and PPOTrainer, made the way detoxify_ppo.main makes them."""

    def __init__(self, opts, config, tokenizer, device, variant):
        from trl import AutoModelForCausalLMWithValueHead, PPOTrainer, create_reference_model

        self.args = detoxify_ppo.Args(
            model=opts.config, batch_size=opts.batch_size, mini_batch_size=opts.mini_batch_size,
            ppo_epochs=opts.ppo_epochs, dtype=opts.dtype, num_shared_layers=variant["shared"],
            gradient_checkpointing=bool(variant["gc"]), seed=opts.seed, output_dir=opts.workdir)
        self.num_shared_layers = detoxify_ppo.resolve_shared_layers(self.args, config)
        dtype = getattr(torch, opts.dtype)
        torch.manual_seed(opts.seed)
        t0 = time.perf_counter()
        base = build_policy(config, device, dtype, variant.get("attn"))
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base).to(device=device, dtype=dtype)
        if variant["ref"] == "trl":  # trl's own: a full deep copy (the shared blocks are frozen, not shared)
            ref_model = create_reference_model(model, num_shared_layers=self.num_shared_layers or None)
        else:
            ref_model = detoxify_ppo.create_shared_reference(model, self.num_shared_layers)
        if variant["plain"]:  # detoxify_ppo before its speed-ups: trl's PPOTrainer as it is, batched generation
            self.trainer = PPOTrainer(detoxify_ppo.make_ppo_config(self.args, opts.warmup + opts.steps), model,
                                      ref_model, tokenizer)
            self.trainer.frozen_prefix_cache = None
        else:  # as detoxify_ppo.main
            self.trainer = detoxify_ppo.build_ppo_trainer(self.args, model, ref_model, tokenizer,
                                                          opts.warmup + opts.steps, self.num_shared_layers)
        # trl reads this class attribute at every step; set it for every setup so no setting leaks into the next
        from trl.trainer.ppo_trainer import PPODecorators

        self.trainer.config.optimize_device_cache = PPODecorators.optimize_device_cache = bool(variant["cache"])
        self.speedups = None if variant["plain"] else Speedups(self.trainer)
        sync(device)
        self.build_seconds = time.perf_counter() - t0
        self.parameters = sum(p.numel() for p in model.pretrained_model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        policy_ptrs = {p.data_ptr() for p in model.parameters()}
        self.reference_own = sum(p.numel() for p in ref_model.parameters() if p.data_ptr() not in policy_ptrs)
        self.weights_bytes = unique_bytes(model, ref_model)
        self.model_ref = weakref.ref(model)

    def close(self, device):
        trainer, self.trainer = self.trainer, None
        trainer.accelerator.free_memory()  # drops accelerate's own references to model and optimizer
        trainer.__dict__.clear()  # model, reference, optimizer, and any wrapper set on the instance
        del trainer
        free_memory(device)


# ---------------------------------------------------------------------------------------------- speed-ups
SPEEDUPS = {"head": "contiguous LM-head input", "prefix": "frozen-prefix cache", "logits": "response-only logits",
            "adam": "fused Adam"}


class Speedups:
    """Switch detoxify_ppo.build_ppo_trainer's speed-ups off (all, or all but `parts`) on one trainer, for a while:
    off while the study's loop (or ours-plain) runs, since the study ran trl's PPOTrainer as it is; added one by one
    in the PPO-phase ablation. trl's own optimiser (Adam with torch's defaults, unfused) is made on first use."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.fused_adam = trainer.optimizer
        self.trl_adam = None
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.head = model.pretrained_model.get_output_embeddings()

    @contextlib.contextmanager
    def only(self, parts=()):
        trainer, cache = self.trainer, self.trainer.frozen_prefix_cache
        if "head" not in parts:
            trainer.head_hook.remove()
        if cache:
            flags = cache.skip_prefix, cache.response_only_logits
            cache.skip_prefix, cache.response_only_logits = "prefix" in parts, "logits" in parts
        if "adam" not in parts:
            if self.trl_adam is None:
                group = self.fused_adam.param_groups[0]
                self.trl_adam = torch.optim.Adam(group["params"], lr=group["lr"])
            trainer.optimizer = self.trl_adam
        try:
            yield
        finally:
            if "head" not in parts:
                trainer.head_hook = self.head.register_forward_pre_hook(detoxify_ppo.contiguous_head_input)
            if cache:
                cache.skip_prefix, cache.response_only_logits = flags
            trainer.optimizer = self.fused_adam


# ---------------------------------------------------------------------------------------------- the loops
def make_batch(rng, tokenizer, opts, step=1):
    """Random queries of 10..15 tokens (CPU tensors, as detoxify_ppo.main hands them to ppo_step) and the
    response lengths detoxify_ppo.response_lengths draws for this step (20..30 tokens)."""
    eos = tokenizer.eos_token_id
    lengths = rng.integers(opts.min_context_tokens, opts.max_context_tokens + 1, size=opts.batch_size)
    queries = [torch.tensor(rng.integers(0, eos, size=n), dtype=torch.long) for n in lengths]
    batch = {"input_ids": queries, "query": tokenizer.batch_decode(queries)}
    return batch, detoxify_ppo.response_lengths(step, opts.batch_size, opts, 0)


def ours_step(setup, tokenizer, reward_fn, batch, lengths, step, device):
    """detoxify_ppo.main's loop body: ppo_step (generate, score, PPO step) and log_stats."""
    sync(device)
    t0 = time.perf_counter()
    stats, responses, rewards = detoxify_ppo.ppo_step(setup.trainer, tokenizer, reward_fn, batch, lengths, step)
    setup.trainer.log_stats(stats, batch, rewards)
    sync(device)
    total = time.perf_counter() - t0
    return {"step": total, "generate": stats["time/generate"], "reward": stats["time/reward"],
            "optimize": stats["time/optimize"], "tokens": int(sum(len(r) for r in responses)),
            **{k.split("/")[-1]: float(v) for k, v in stats.items() if k.startswith("time/ppo/")}}


def study_step(setup, tokenizer, reward, batch, lengths, device):
    """The study's loop (trl's examples/research_projects/toxicity/scripts/gpt-j-6b-toxicity.py): one
    ppo_trainer.generate per query with max_new_tokens from a length sampler, decode, one classifier pass
    (no torch.no_grad, as there), a list of 0-d reward tensors, then ppo_trainer.step and log_stats."""
    trainer = setup.trainer
    reward_tok, reward_model, reward_index = reward
    gen_kwargs = dict(STUDY_GEN_KWARGS, pad_token_id=tokenizer.eos_token_id)
    batch["input_ids"] = [q.to(device) for q in batch["input_ids"]]  # its dataloader was prepared by accelerate
    sync(device)
    t0 = time.perf_counter()
    responses = []
    for query, gen_len in zip(batch["input_ids"], lengths):
        gen_kwargs["max_new_tokens"] = int(gen_len)
        response = trainer.generate(query, **gen_kwargs)
        responses.append(response.squeeze()[-int(gen_len):])
    batch["response"] = [tokenizer.decode(r.squeeze()) for r in responses]
    t1 = time.perf_counter()
    inputs = reward_tok(batch["response"], padding=True, truncation=True, return_tensors="pt").to(device)
    logits = reward_model(**inputs).logits.float()
    rewards = [torch.tensor(x) for x in logits[:, reward_index].tolist()]
    t2 = time.perf_counter()
    stats = trainer.step(batch["input_ids"], responses, rewards)
    t3 = time.perf_counter()
    trainer.log_stats(stats, batch, rewards)
    sync(device)
    total = time.perf_counter() - t0
    return {"step": total, "generate": t1 - t0, "reward": t2 - t1, "optimize": t3 - t2,
            "tokens": int(sum(len(r) for r in responses)),
            **{k.split("/")[-1]: float(v) for k, v in stats.items() if k.startswith("time/ppo/")}}


def summarise(name, loop, records, opts, setup, variant, device, peak, truncated, warmup):
    if not records:
        return {"name": name, "loop": loop, "error": "no step measured within the time budget"}
    i = median_index([r["step"] for r in records])
    med = records[i]
    result = {
        "name": name, "kind": "ppo", "config": opts.config, "loop": loop, "device": str(device), "dtype": opts.dtype,
        "batch_size": opts.batch_size, "mini_batch_size": opts.mini_batch_size, "ppo_epochs": opts.ppo_epochs,
        "context_tokens": [opts.min_context_tokens, opts.max_context_tokens],
        "new_tokens": [opts.min_new_tokens, opts.max_new_tokens],
        "num_shared_layers": setup.num_shared_layers, "gradient_checkpointing": bool(variant["gc"]),
        "reference": "trl create_reference_model (full copy)" if variant["ref"] == "trl" else "shared storage",
        "optimize_device_cache": bool(variant["cache"]), "attn_implementation": variant.get("attn") or "default",
        "default_settings": settings_of(variant) == DEFAULT_SETTINGS and (opts.batch_size, opts.mini_batch_size, opts.ppo_epochs,
                                                           opts.dtype) == DEFAULT_PPO,
        "parameters": setup.parameters, "trainable_parameters": setup.trainable,
        "reference_own_parameters": setup.reference_own, "weights_bytes": setup.weights_bytes,
        "build_seconds": round(setup.build_seconds, 3), "warmup_steps": warmup, "measured_steps": len(records),
        "truncated": truncated,
        "median": {k: med[k] for k in ("step", "generate", "reward", "optimize")},
        "median_optimize_split": {k: v for k, v in med.items()
                                  if k not in ("step", "generate", "reward", "optimize", "tokens")},
        "median_tokens": med["tokens"],
        "episodes_per_second": opts.batch_size / med["step"],
        "generated_tokens_per_second": med["tokens"] / med["step"],
        "steps": records,
        "peak_memory_bytes": peak,
        "memory_kind": "cuda_max_allocated" if torch.device(device).type == "cuda" else "process_peak_rss",
    }
    if loop != "study":
        steps, hours = projected_hours(med["step"], opts.batch_size, RTP_ROWS)
        result["projection_all_rows"] = {"kept_rows": RTP_ROWS, "steps": steps, "hours": hours,
                                         "formula": "floor((K - ceil(0.2 K)) / batch) x median step seconds"}
    return result


DEFAULT_SETTINGS = {"shared": None, "gc": 0, "ref": "shared", "cache": 0, "attn": None}  # detoxify_ppo's defaults
DEFAULT_PPO = (detoxify_ppo.Args.batch_size, detoxify_ppo.Args.mini_batch_size, detoxify_ppo.Args.ppo_epochs,
               detoxify_ppo.Args.dtype)


def parse_variant(text, opts):
    """'shared=20,gc=1,ref=trl,cache=1,attn=sdpa,plain=1,steps=2,warmup=1' over the command line's defaults.

    plain=1: this setup is trl's PPOTrainer as it is (no speed-ups) and runs only the ours-plain loop, with
    one optimizer (so its memory is comparable with ours); steps/warmup override the step counts."""
    variant = {"shared": opts.num_shared_layers, "gc": int(opts.gradient_checkpointing), "ref": opts.reference,
               "cache": int(opts.optimize_device_cache), "attn": opts.attn_implementation, "plain": 0,
               "steps": None, "warmup": None}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key not in variant:
            raise SystemExit(f"error: unknown variant key {key!r} in {text!r} ({', '.join(variant)})")
        if key == "shared":
            variant[key] = None if value in ("default", "") else int(value)
        elif key in ("gc", "cache", "plain"):
            variant[key] = int(value in ("1", "on", "true"))
        elif key in ("steps", "warmup"):
            variant[key] = int(value)
        elif key == "ref":
            if value not in ("shared", "trl"):
                raise SystemExit(f"error: ref must be shared or trl, got {value!r}")
            variant[key] = value
        else:
            variant[key] = value or None
    return variant


def settings_of(variant):
    return {k: variant[k] for k in ("shared", "gc", "ref", "cache", "attn")}


def variant_label(variant, setup=None):
    shared = setup.num_shared_layers if setup else variant["shared"]
    parts = [f"shared={shared if shared is not None else 'default'}", f"gc={'on' if variant['gc'] else 'off'}"]
    if variant["ref"] == "trl":
        parts.append("ref=trl-copy")
    if variant["cache"]:
        parts.append("optimize_device_cache")
    if variant.get("attn"):
        parts.append(f"attn={variant['attn']}")
    return ",".join(parts)


def run_variant(opts, config, tokenizer, reward, device, variant, loops, deadline, warmup, steps):
    """Build one setup, run warm-up + measured steps of each loop, interleaved step by step (same load for all)."""
    started = time.perf_counter()
    free_memory(device)
    setup = Setup(opts, config, tokenizer, device, variant)
    reward_tok, reward_model, reward_index = reward
    reward_fn = functools.partial(detoxify_ppo.score_responses, reward_tok, reward_model, reward_index,
                                  batch_size=setup.args.reward_batch_size)
    label = variant_label(variant, setup)
    rng = np.random.default_rng(opts.seed)
    records = {loop: [] for loop in loops}
    peaks = {loop: 0 for loop in loops}
    truncated = False
    iteration_seconds = 0.0
    cuda = torch.device(device).type == "cuda"
    for i in range(warmup + steps):
        budget_left = min(started + opts.config_budget, deadline) - time.perf_counter()
        if i > 0 and budget_left < 1.2 * iteration_seconds and any(records.values()):
            truncated = True
            break
        t_iter = time.perf_counter()
        # every loop gets the same queries and lengths (the same work); the order rotates, so no loop always
        # runs right after another
        batch, lengths = make_batch(rng, tokenizer, opts, step=i + 1)
        for loop in loops[i % len(loops):] + loops[:i % len(loops)]:
            batch = {"input_ids": list(batch["input_ids"]), "query": list(batch["query"])}  # the steps add keys
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()
            # the study's loop and ours-plain run trl's PPOTrainer as it is: the speed-ups are off meanwhile
            with setup.speedups.only() if setup.speedups and loop != "ours" else contextlib.nullcontext():
                if loop == "study":
                    record = study_step(setup, tokenizer, reward, batch, lengths, device)
                else:
                    record = ours_step(setup, tokenizer, reward_fn, batch, lengths, i + 1, device)
            peaks[loop] = max(peaks[loop], torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes())
            if i >= warmup:
                records[loop].append({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()})
            print(f"  {opts.config} {label} {loop} {'warm-up' if i < warmup else 'step'} {i + 1}: "
                  f"{record['step']:.3f} s (generate {record['generate']:.3f}, reward {record['reward']:.3f}, "
                  f"optimize {record['optimize']:.3f})", flush=True)
        iteration_seconds = time.perf_counter() - t_iter
    results = [summarise(f"{opts.config}/{label}/{loop}", loop, records[loop], opts, setup, variant, device,
                         peaks[loop], truncated, warmup) for loop in loops]
    by_loop = {r["loop"]: r for r in results if "error" not in r}
    if "study" in by_loop:
        for r in by_loop.values():
            if r["loop"] != "study":
                r["speedup_vs_study"] = r["episodes_per_second"] / by_loop["study"]["episodes_per_second"]
                # per interleaved iteration (same load for both): a steadier ratio on a shared machine
                pairs = [b["step"] / a["step"] for a, b in zip(records[r["loop"]], records["study"])]
                r["speedup_vs_study_paired"] = {"median": float(np.median(pairs)), "min": min(pairs),
                                                "max": max(pairs)}
    if "ours" in by_loop:
        by_loop["ours"]["speedups"] = list(SPEEDUPS.values())
        if "ours-plain" in by_loop:
            by_loop["ours"]["speedup_vs_plain"] = (by_loop["ours"]["episodes_per_second"]
                                                   / by_loop["ours-plain"]["episodes_per_second"])
    model_ref = setup.model_ref
    setup.close(device)
    for r in results:
        r["variant"] = label
        r["seconds_total"] = round(time.perf_counter() - started, 2)
        r["freed"] = model_ref() is None
    return results


def run_optimize_ablation(opts, config, tokenizer, reward, device, rounds, deadline=float("inf")):
    """trainer.step alone on one fixed batch, the PPO-phase changes added one by one, round-robin (same load)."""
    started = time.perf_counter()
    free_memory(device)
    setup = Setup(opts, config, tokenizer, device, parse_variant("", opts))
    batch, lengths = make_batch(np.random.default_rng(opts.seed), tokenizer, opts)
    responses = detoxify_ppo.sample_responses(setup.trainer, tokenizer, batch["input_ids"], lengths)
    scores = [torch.tensor(float(x)) for x in np.random.default_rng(opts.seed).normal(size=len(responses))]
    combos = [("trl step", ()), ("+ frozen-prefix cache", ("prefix",)),
              ("+ response-only logits", ("prefix", "logits")), ("+ fused Adam", ("prefix", "logits", "adam"))]
    times = {name: [] for name, _ in combos}
    round_seconds = 0.0
    for r in range(rounds + 1):  # round 0 warms up
        if r > 1 and time.perf_counter() + 1.2 * round_seconds > deadline:
            break  # keep the rounds done
        t_round = time.perf_counter()
        for name, parts in combos:
            with setup.speedups.only(parts):
                sync(device)
                t0 = time.perf_counter()
                setup.trainer.step(batch["input_ids"], responses, scores)
                sync(device)
            if r:
                times[name].append(round(time.perf_counter() - t0, 5))
            print(f"  {opts.config} ablation round {r} {name}: {time.perf_counter() - t0:.3f} s", flush=True)
        round_seconds = time.perf_counter() - t_round
    rounds = len(times["trl step"])
    base = times["trl step"]
    result = {"name": f"{opts.config}/optimize-ablation", "kind": "optimize-ablation", "config": opts.config,
              "device": str(device), "dtype": opts.dtype, "batch_size": opts.batch_size,
              "mini_batch_size": opts.mini_batch_size, "ppo_epochs": opts.ppo_epochs,
              "num_shared_layers": setup.num_shared_layers, "rounds": rounds,
              "response_tokens": int(sum(len(x) for x in responses)),
              "steps": {name: {"seconds": t, "median": float(np.median(t)),
                               "paired_speedup_median": float(np.median([b / x for b, x in zip(base, t)]))}
                        for name, t in times.items()}}
    setup.close(device)
    result["seconds_total"] = round(time.perf_counter() - started, 2)
    return result


# ---------------------------------------------------------------------------------------------- evaluation
def run_eval(opts, config, reward_model, device):
    """evaluate_toxicity.py's own generate() and toxicity measurement on random prompts; samples/s."""
    import evaluate_toxicity
    from detox_common import resolve_dtype

    started = time.perf_counter()
    dtype = resolve_dtype("auto", device)  # evaluate_toxicity's default: bfloat16 on GPU, float32 on CPU
    tokenizer = policy_tokenizer(config.vocab_size)
    tokenizer.padding_side = "left"  # as evaluate_toxicity.load_causal_lm sets
    torch.manual_seed(opts.seed)
    model = build_policy(config, device, dtype).eval()
    classifier_dir = os.path.join(opts.workdir, "classifier")
    # saved in float32: on CPU the measurement loads it as saved, as it would the real classifier
    copy.deepcopy(reward_model).float().save_pretrained(classifier_dir)
    reward_tokenizer(reward_model.config.vocab_size, reward_model.config.max_position_embeddings - 2).save_pretrained(
        classifier_dir)
    eval_args = evaluate_toxicity.Args(toxicity_model=classifier_dir, output_dir=opts.workdir,
                                       score_batch_size=opts.eval_score_batch_size, batch_size=opts.eval_batch_size,
                                       max_new_tokens=opts.max_new_tokens)
    toxicity = evaluate_toxicity.load_toxicity_measurement(eval_args, device)
    rng = np.random.default_rng(opts.seed)
    lo, hi = opts.eval_prompt_tokens
    eos = tokenizer.eos_token_id
    prompts = [rng.integers(0, eos, size=n).tolist() for n in rng.integers(lo, hi + 1, size=opts.eval_samples)]
    # warm-up: one small batch through both
    warm = evaluate_toxicity.generate(model, tokenizer, prompts[:2], 1, 4, 2, desc="warm-up")
    toxicity.compute(predictions=[tokenizer.decode(s[0], skip_special_tokens=True) for s in warm], toxic_label="hate")
    sync(device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    t0 = time.perf_counter()
    new_ids = evaluate_toxicity.generate(model, tokenizer, prompts, 1, opts.max_new_tokens, opts.eval_batch_size,
                                         desc="eval")
    texts = [tokenizer.decode(s[0], skip_special_tokens=True) for s in new_ids]
    sync(device)
    t1 = time.perf_counter()
    scores = toxicity.compute(predictions=texts, toxic_label="hate")["toxicity"]
    sync(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else peak_rss_bytes()
    tokens = sum(len(s[0]) for s in new_ids)
    del model, toxicity
    free_memory(device)
    return {"name": f"{opts.config}/eval", "kind": "eval", "config": opts.config, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "samples": len(scores), "batch_size": opts.eval_batch_size,
            "score_batch_size": opts.eval_score_batch_size, "prompt_tokens": [lo, hi],
            "max_new_tokens": opts.max_new_tokens, "generate_seconds": t1 - t0, "score_seconds": t2 - t1,
            "seconds": t2 - t0, "samples_per_second": len(scores) / (t2 - t0), "generated_tokens": tokens,
            "generated_tokens_per_second": tokens / (t1 - t0), "peak_memory_bytes": peak,
            "memory_kind": "cuda_max_allocated" if torch.device(device).type == "cuda" else "process_peak_rss",
            "code_path": "evaluate_toxicity.generate + evaluate_toxicity.load_toxicity_measurement(...).compute",
            "seconds_total": round(time.perf_counter() - started, 2)}


# ---------------------------------------------------------------------------------------------- output
def load_results(path, append):
    if append and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"benchmark": "benchmarks/bench_ppo.py", "study": STUDY, "runs": [], "results": []}


def write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def table(results):
    lines = ["| result | step s | generate s | reward s | optimize s | episodes/s | tokens/s | peak memory | vs study |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("kind") == "optimize-ablation" and "error" not in r:
            for name, t in r["steps"].items():
                lines.append(f"| {r['name']}: {name} | {t['median']:.3f} | | | {t['median']:.3f} | | | | "
                             f"{t['paired_speedup_median']:.2f}x trl step |")
        elif "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | | | | | | | |")
        elif r.get("kind") == "eval":
            lines.append(f"| {r['name']} ({r['samples']} samples) | {r['seconds']:.3f} | {r['generate_seconds']:.3f} | "
                         f"{r['score_seconds']:.3f} | | {r['samples_per_second']:.2f} samples/s | "
                         f"{r['generated_tokens_per_second']:.1f} | {gib(r['peak_memory_bytes'])} | |")
        else:
            m = r["median"]
            speedup = f"{r['speedup_vs_study']:.2f}x" if "speedup_vs_study" in r else ""
            lines.append(f"| {r['name']} | {m['step']:.3f} | {m['generate']:.3f} | {m['reward']:.3f} | "
                         f"{m['optimize']:.3f} | {r['episodes_per_second']:.3f} | "
                         f"{r['generated_tokens_per_second']:.1f} | {gib(r['peak_memory_bytes'])} | {speedup} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt-neo-125m", choices=sorted(POLICIES), help="policy size")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, 1 warm-up + 2 steps: ours, ours-plain, the study's loop, ablation, eval")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default=detoxify_ppo.Args.dtype, choices=["bfloat16", "float16", "float32"],
                   help="policy dtype (detoxify_ppo's default: bfloat16)")
    p.add_argument("--batch-size", type=int, default=detoxify_ppo.Args.batch_size)
    p.add_argument("--mini-batch-size", type=int, default=detoxify_ppo.Args.mini_batch_size)
    p.add_argument("--ppo-epochs", type=int, default=detoxify_ppo.Args.ppo_epochs)
    p.add_argument("--min-context-tokens", type=int, default=detoxify_ppo.Args.min_context_tokens)
    p.add_argument("--max-context-tokens", type=int, default=detoxify_ppo.Args.max_context_tokens)
    p.add_argument("--min-new-tokens", type=int, default=detoxify_ppo.Args.min_new_tokens)
    p.add_argument("--max-new-tokens", type=int, default=detoxify_ppo.Args.max_new_tokens)
    p.add_argument("--num-shared-layers", type=int, default=None, help="default: detoxify_ppo's (20/28 of the blocks)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--reference", default="shared", choices=["shared", "trl"],
                   help="shared: detoxify_ppo.create_shared_reference; trl: trl.create_reference_model (full copy)")
    p.add_argument("--optimize-device-cache", action="store_true", help="trl's PPOConfig.optimize_device_cache")
    p.add_argument("--attn-implementation", default=None, help="e.g. eager or sdpa (default: transformers')")
    p.add_argument("--variant", action="append", default=[],
                   help="extra settings measured one after the other, e.g. 'shared=20,gc=1' or 'ref=trl' (repeatable)")
    p.add_argument("--baseline", action="store_true", help="also time the study's loop, interleaved with ours")
    p.add_argument("--plain", action="store_true",
                   help="also time ours with build_ppo_trainer's speed-ups off (loop ours-plain), interleaved")
    p.add_argument("--optimize-ablation", type=int, default=0, metavar="ROUNDS",
                   help="also time trainer.step alone with the PPO-phase changes added one by one, ROUNDS rounds")
    p.add_argument("--eval", action="store_true", help="also time evaluate_toxicity.py's generation + scoring")
    p.add_argument("--eval-samples", type=int, default=None, help="default 400 on GPU (the study's), 64 on CPU")
    p.add_argument("--eval-batch-size", type=int, default=32, help="evaluate_toxicity's --batch-size default")
    p.add_argument("--eval-score-batch-size", type=int, default=64)
    p.add_argument("--eval-prompt-tokens", type=int, nargs=2, default=[10, 100], metavar=("MIN", "MAX"),
                   help="random prompt lengths for the evaluation timing")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="measured steps (after warm-up)")
    p.add_argument("--variant-steps", type=int, default=None, help="measured steps of each --variant (default --steps)")
    p.add_argument("--variant-warmup", type=int, default=None, help="warm-up steps of each --variant (default --warmup)")
    p.add_argument("--config-budget", type=float, default=1e9, help="seconds per variant; fewer steps if exceeded")
    p.add_argument("--deadline", type=float, default=None, help="seconds from start for everything in this run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output JSON (default results/bench_ppo_<config>_<device>.json)")
    p.add_argument("--append", action="store_true", help="add to an existing JSON instead of starting afresh")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.config, opts.baseline, opts.plain, opts.eval = "tiny", True, True, True
        opts.optimize_ablation = opts.optimize_ablation or 1
        opts.warmup, opts.steps = 1, 2
        opts.eval_samples = opts.eval_samples or 16
        opts.variant = opts.variant or []
    return opts


def main(argv=None):
    opts = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + (opts.deadline if opts.deadline else 1e9)
    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cuda = torch.device(device).type == "cuda"
    if opts.eval_samples is None:
        opts.eval_samples = 400 if cuda else 64
    opts.json = opts.json or os.path.join(ROOT, "results", f"bench_ppo_{opts.config}_{'cuda' if cuda else 'cpu'}.json")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data = load_results(opts.json, opts.append)
    run_info = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] +
                                                 (sys.argv[1:] if argv is None else list(argv))),
                "machine": machine_info(device)}
    data["runs"].append(run_info)
    write_json(opts.json, data)
    print(f"bench_ppo: {opts.config} on {run_info['machine'].get('gpu', run_info['machine']['cpu'])} "
          f"({device}), writing {opts.json}", flush=True)

    own = []

    def record(result):
        result["run"] = len(data["runs"]) - 1
        data["results"].append(result)
        own.append(result)
        write_json(opts.json, data)  # after every result: a later crash or time-out keeps it

    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as workdir:
        opts.workdir = workdir
        config = policy_config(opts.config)
        tokenizer = policy_tokenizer(config.vocab_size)
        reward_tok, reward_model = build_reward("tiny" if opts.config.startswith("tiny") else "roberta-base", device)
        reward = (reward_tok, reward_model, 0)  # index 0 = "nothate", the study's raw logit
        variants = [parse_variant("", opts)] + [parse_variant(v, opts) for v in opts.variant]
        last_variant_seconds = 0.0
        for n, variant in enumerate(variants):
            # a variant that cannot finish before the deadline (judged by the last one) is not started
            if deadline - time.perf_counter() < 0.8 * last_variant_seconds or time.perf_counter() > deadline:
                record({"name": f"{opts.config}/{variant_label(variant)}", "loop": "ours",
                        "error": "skipped: run deadline reached"})
                continue
            t_variant = time.perf_counter()
            if variant["plain"]:
                loops = ["ours-plain"]
            else:
                loops = ["ours"] + (["ours-plain"] if opts.plain and n == 0 else []) + (
                    ["study"] if opts.baseline and n == 0 else [])
            try:
                steps = opts.steps if n == 0 else (opts.variant_steps or opts.steps)
                warmup = opts.warmup if n == 0 else (opts.variant_warmup if opts.variant_warmup is not None
                                                     else opts.warmup)
                steps = variant["steps"] if variant["steps"] is not None else steps
                warmup = variant["warmup"] if variant["warmup"] is not None else warmup
                for result in run_variant(opts, config, tokenizer, reward, device, variant, loops, deadline,
                                          warmup, steps):
                    record(result)
            except (torch.cuda.OutOfMemoryError, SystemExit, Exception) as e:  # one failure must not lose the rest
                message = str(e).splitlines()[0] if str(e) else ""
                kind = "CUDA out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
                record({"name": f"{opts.config}/{variant_label(variant)}", "loop": "ours",
                        "error": f"{kind}: {message}"})
                print(f"  {opts.config} {variant_label(variant)}: {kind}: {message}", flush=True)
                free_memory(device)
            last_variant_seconds = time.perf_counter() - t_variant
            print(table(own[-len(loops):]), flush=True)
        if opts.optimize_ablation and time.perf_counter() < deadline:
            try:
                record(run_optimize_ablation(opts, config, tokenizer, reward, device, opts.optimize_ablation,
                                             deadline))
            except (SystemExit, Exception) as e:
                message = str(e).splitlines()[0] if str(e) else ""
                record({"name": f"{opts.config}/optimize-ablation", "kind": "optimize-ablation",
                        "error": f"{type(e).__name__}: {message}"})
                free_memory(device)
        if opts.eval:
            if time.perf_counter() > deadline:
                record({"name": f"{opts.config}/eval", "kind": "eval", "error": "skipped: run deadline reached"})
            else:
                try:
                    record(run_eval(opts, config, reward_model, device))
                except (SystemExit, Exception) as e:  # e.g. evaluate_toxicity.py mid-edit: keep the PPO results
                    message = str(e).splitlines()[0] if str(e) else ""
                    record({"name": f"{opts.config}/eval", "kind": "eval", "error": f"{type(e).__name__}: {message}"})
                    print(f"  eval failed: {type(e).__name__}: {message}", flush=True)
                    free_memory(device)
    print()
    print(table(own))
    print(f"wrote {opts.json} in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
