#!/usr/bin/env python3
"""Time detoxify_ppo.py's PPO steps (and evaluate_toxicity.py's generation + scoring) against the study's loop.

Random-weight models of the real sizes (random_models.py, nothing downloaded); detoxify_ppo's own options, builders
and ppo_step. The loops run interleaved on one trainer, on the same batches in rotating order: ours; ours-plain
(--plain) and study (--baseline: one ppo_trainer.generate per query), both under trainer.speedups_only(), i.e. on
trl's PPOTrainer as it is. Per loop: the median measured step (a real one) split into generation, reward and
optimisation, episodes/s, tokens/s, peak memory (CUDA max allocated, or the process's RSS high-water mark). JSON
(--json) is rewritten after every result; render.py's tables are printed.

    python benchmarks/bench_ppo.py --size gpt-neo-125m --baseline --plain --eval
    python benchmarks/bench_ppo.py --size gpt-j-6b --variant plain=1 ref=trl shared=0,gc=1
    python benchmarks/bench_ppo.py --quick          # tiny model, seconds (what tests/test_benchmarks.py runs)
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
import weakref
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: detoxify_ppo and friends live one folder up
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")  # never the network: every model here is built in memory
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", message=r".*attention mask.*")  # the study's loop passes none, as it did
warnings.filterwarnings("ignore", message=r".*pad_token_id.*")

import detoxify_ppo  # noqa: E402
import random_models  # noqa: E402
import render  # noqa: E402
from detox_common import DTYPES, cli_parser  # noqa: E402
from detoxify_ppo import option  # noqa: E402
from ppo_speedups import SPEEDUPS, SpeedupPPOTrainer  # noqa: E402

RTP_ROWS = 99_442  # allenai/real-toxicity-prompts, one split (REFERENCE.md)
STUDY = {"loop": "one ppo_trainer.generate per query, then ppo_trainer.step", "ppo_epochs": 100,
         "batch_size": 16, "mini_batch_size": 4, "hours": 33, "gpu": "one A100-80GB",
         "source": "public report of the study's GPT-J-6B script (REFERENCE.md)"}
STUDY_GEN_KWARGS = {"min_length": -1, "top_k": 0, "top_p": 1.0, "do_sample": True}  # the study's (top_k 0.0 there)
PHASES = ("generate", "reward", "optimize")

# detoxify_ppo options the benchmark acts on; any other one given is refused (--config, --model, --use-peft, ...)
USED_ARGS = ("min_context_tokens", "max_context_tokens", "min_new_tokens", "max_new_tokens", "reward_batch_size",
             "reward_dtype", "dtype", "num_shared_layers", "learning_rate", "batch_size", "mini_batch_size",
             "gradient_accumulation_steps", "ppo_epochs", "init_kl_coef", "adap_kl_ctrl", "target_kl", "seed",
             "steps", "frozen_prefix_cache", "response_only_logits", "gradient_checkpointing")
DEFAULTS = detoxify_ppo.Args()
# "default_settings": these options at detoxify_ppo's defaults, and the variant's settings at DEFAULT_SETTINGS
DEFAULT_ARGS = [k for k in USED_ARGS if k not in ("steps", "seed", "num_shared_layers", "gradient_checkpointing")]
DEFAULT_SETTINGS = {"shared": None, "gc": 0, "ref": "shared", "cache": 0}


@dataclasses.dataclass
class BenchArgs:
    size: str = option("gpt-neo-125m", "policy size (random weights)", choices=sorted(random_models.POLICIES))
    quick: bool = option(False, "tiny model, 1 warm-up + 2 steps: ours, ours-plain, the study's loop, ablation, eval")
    device: str = option("auto", "auto (cuda if available), cpu or cuda")
    variant: list[str] = dataclasses.field(default_factory=list, metadata={"action": "extend", "help": (
        "settings measured one after the other, each on a setup of its own, e.g. shared=20,gc=1 ref=trl plain=1 "
        "cache=1 (see parse_variant)")})
    baseline: bool = option(False, "also time the study's loop, interleaved with ours")
    plain: bool = option(False, "also time ours under trainer.speedups_only() (loop ours-plain), interleaved")
    optimize_ablation: int = option(0, "also time trainer.step alone with the PPO-phase speed-ups added one by one, "
                                    "this many rounds", metavar="ROUNDS")
    eval: bool = option(False, "also time evaluate_toxicity.py's generation + scoring")
    eval_samples: Optional[int] = option(None, "prompts of 10-100 random tokens for --eval; default 400 on GPU (the "
                                         "study's), 64 on CPU; batches as evaluate_toxicity.py's defaults")
    warmup: int = option(1, "warm-up steps before the measured ones (--steps)")
    variant_steps: Optional[int] = option(None, "measured steps of each --variant (default --steps)")
    variant_warmup: Optional[int] = option(None, "warm-up steps of each --variant (default --warmup)")
    variant_budget: float = option(1e9, "seconds per variant; fewer steps if exceeded")
    deadline: Optional[float] = option(None, "seconds from start for everything in this run")
    threads: Optional[int] = option(None, "torch CPU threads (default: torch's)")
    json: Optional[str] = option(None, "output JSON (default results/bench_ppo_<size>_<device>.json)")
    append: bool = option(False, "add to an existing JSON instead of starting afresh")


def build_parser():
    parser = cli_parser((detoxify_ppo.Args, BenchArgs), __doc__, detoxify_ppo.NO_FLAG_HELP)
    for action in parser._actions:
        if action.dest in DEFAULTS.__dict__ and action.dest not in USED_ARGS:
            action.help = argparse.SUPPRESS
        elif action.dest == "steps":
            action.help = "measured steps after warm-up (None: 3)"
    return parser


def parse_args(argv=None):
    """(detoxify_ppo.Args, BenchArgs) from the command line."""
    parser = build_parser()
    args, opts = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else list(argv))
    unused = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(args)
              if f.name not in USED_ARGS and getattr(args, f.name) != getattr(DEFAULTS, f.name)]
    if unused:
        parser.error(f"{', '.join(unused)}: not used by the benchmark (it builds random models of --size; --config "
                     "is detoxify_ppo.py's YAML file)")
    if opts.quick:
        opts.size, opts.baseline, opts.plain, opts.eval, opts.warmup, args.steps = "tiny", True, True, True, 1, 2
        opts.optimize_ablation, opts.eval_samples = opts.optimize_ablation or 1, opts.eval_samples or 16
    args.steps, args.model = args.steps or 3, opts.size
    return args, opts


# ---------------------------------------------------------------------------------------------- helpers
def is_cuda(device):
    return torch.device(device).type == "cuda"


def sync(device):
    if is_cuda(device):
        torch.cuda.synchronize()


def free_memory(device):
    for _ in range(3):  # hooks and wrapped methods form cycles that can take more than one pass
        if not gc.collect():
            break
    if is_cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def reset_peak(device):
    """Start a new peak: CUDA's max allocated, or the RSS high-water mark (Linux: 5 in clear_refs resets VmHWM)."""
    if is_cuda(device):
        return torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # elsewhere the mark is the process's, from its start


def peak_bytes(device):
    if is_cuda(device):
        return torch.cuda.max_memory_allocated()
    with contextlib.suppress(OSError, StopIteration), open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_kind(device):
    return "cuda_max_allocated" if is_cuda(device) else "process_peak_rss"


def machine_info(device):
    import transformers
    import trl

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "nice": os.nice(0), "device": str(device)}
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if is_cuda(device):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


# ---------------------------------------------------------------------------------------------- setups and variants
class Setup:
    """Policy with value head, reference and trainer from detoxify_ppo's builders, as detoxify_ppo.main makes
    them, with the variant's sharing, checkpointing and reference; plain=1: the trainer has no speed-ups."""

    def __init__(self, args, opts, config, tokenizer, device, variant):
        from trl import create_reference_model
        from trl.trainer.ppo_trainer import PPODecorators

        self.args = dataclasses.replace(args, num_shared_layers=variant["shared"],
                                        gradient_checkpointing=bool(variant["gc"]))
        n = self.num_shared_layers = detoxify_ppo.resolve_shared_layers(variant["shared"], config)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        base = random_models.build_policy(config, device, DTYPES[args.dtype])
        model, ref_model = detoxify_ppo.build_models(base, n)
        if variant["ref"] == "trl":  # trl's own: a full deep copy (the shared blocks are frozen, not shared)
            del ref_model
            ref_model = create_reference_model(model, num_shared_layers=n or None)
        ppo_config = detoxify_ppo.make_ppo_config(self.args, opts.warmup + args.steps)
        if variant["plain"]:  # trl's PPOTrainer as it is, on a setup of its own (one optimizer, comparable memory)
            self.trainer = SpeedupPPOTrainer(ppo_config, model, ref_model, tokenizer, n, speedups=())
        else:  # as detoxify_ppo.main
            self.trainer = detoxify_ppo.build_ppo_trainer(ppo_config, model, ref_model, tokenizer, n,
                                                          args.frozen_prefix_cache, args.response_only_logits)
        # trl reads this class attribute at every step; set it for every setup so no setting leaks into the next
        self.trainer.config.optimize_device_cache = PPODecorators.optimize_device_cache = bool(variant["cache"])
        sync(device)
        self.build_seconds = time.perf_counter() - t0
        self.parameters = sum(p.numel() for p in model.pretrained_model.parameters())
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        policy_ptrs = {p.data_ptr() for p in model.parameters()}
        self.reference_own = sum(p.numel() for p in ref_model.parameters() if p.data_ptr() not in policy_ptrs)
        storages = {(p.device, p.untyped_storage().data_ptr()): p.untyped_storage().nbytes()
                    for module in (model, ref_model) for p in module.parameters()}
        self.weights_bytes = sum(storages.values())  # shared storage counts once
        self.model_ref = weakref.ref(model)

    def close(self, device):
        self.trainer.accelerator.free_memory()  # drops accelerate's own references to model and optimizer
        self.trainer.__dict__.clear()  # model, reference, optimizers, hook handles
        self.trainer = None
        free_memory(device)


FLAG = {"0": 0, "off": 0, "false": 0, "1": 1, "on": 1, "true": 1}.__getitem__
VARIANT_KEYS = {"shared": lambda v: None if v in ("default", "") else int(v), "gc": FLAG, "cache": FLAG,
                "plain": FLAG, "ref": {"shared": "shared", "trl": "trl"}.__getitem__, "steps": int, "warmup": int}


def parse_variant(text, args, opts):
    """'shared=20,gc=1,ref=trl,cache=1,plain=1,steps=2,warmup=1' over the command line's settings.

    shared/gc: --num-shared-layers/--gradient-checkpointing; ref=trl: trl.create_reference_model's full copy
    instead of detoxify_ppo.create_shared_reference; cache=1: trl's PPOConfig.optimize_device_cache; plain=1: the
    trainer is built without speed-ups (trl's PPOTrainer as it is) and runs only the ours-plain loop, with one
    optimizer (so its memory is comparable with ours); steps/warmup override the step counts."""
    variant = {"shared": args.num_shared_layers, "gc": int(args.gradient_checkpointing), "ref": "shared",
               "cache": 0, "plain": 0, "steps": None, "warmup": None}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        try:
            variant[key] = VARIANT_KEYS[key](value)
        except (KeyError, ValueError):
            raise SystemExit(f"error: bad variant {item!r} in {text!r} (keys: {', '.join(VARIANT_KEYS)})") from None
    return variant


def settings_of(variant):
    return {k: variant[k] for k in DEFAULT_SETTINGS}


def variant_label(variant, setup=None):
    shared = setup.num_shared_layers if setup else variant["shared"]
    parts = [f"shared={shared if shared is not None else 'default'}", f"gc={'on' if variant['gc'] else 'off'}"]
    parts += ["ref=trl-copy"] * (variant["ref"] == "trl") + ["optimize_device_cache"] * variant["cache"]
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------- the loops
def make_batch(rng, tokenizer, args, step=1):
    """Random queries of --min..--max-context-tokens (CPU tensors, as detoxify_ppo.main hands them to ppo_step)
    and the response lengths detoxify_ppo.response_lengths draws for this step."""
    sizes = rng.integers(args.min_context_tokens, args.max_context_tokens + 1, size=args.batch_size)
    queries = [torch.tensor(rng.integers(0, tokenizer.eos_token_id, size=n), dtype=torch.long) for n in sizes]
    lengths = detoxify_ppo.response_lengths(step, args.batch_size, args.min_new_tokens, args.max_new_tokens,
                                            args.seed, 0)
    return {"input_ids": queries, "query": tokenizer.batch_decode(queries)}, lengths


def timed_step(loop, setup, tokenizer, reward, batch, lengths, step, device):
    """One timed step of `loop`. ours, ours-plain: detoxify_ppo.main's loop body, ppo_step (one batched generate,
    score, PPO step) and log_stats. study: the study's loop (trl's examples/research_projects/toxicity/scripts/
    gpt-j-6b-toxicity.py): one ppo_trainer.generate per query with max_new_tokens from a length sampler, decode,
    one classifier pass (no torch.no_grad, as there), a list of 0-d reward tensors, ppo_trainer.step, log_stats."""
    trainer, (reward_tok, reward_model, reward_index) = setup.trainer, reward
    if loop == "study":
        batch["input_ids"] = [q.to(device) for q in batch["input_ids"]]  # its dataloader was prepared by accelerate
    sync(device)
    t0 = time.perf_counter()
    if loop != "study":
        reward_fn = functools.partial(detoxify_ppo.score_responses, [("reward", *reward, 1.0)],
                                      batch_size=setup.args.reward_batch_size)
        stats, responses, rewards = detoxify_ppo.ppo_step(trainer, tokenizer, reward_fn, batch, lengths, step)
        phases = [stats[f"time/{phase}"] for phase in PHASES]
    else:
        responses, gen_kwargs = [], dict(STUDY_GEN_KWARGS, pad_token_id=tokenizer.eos_token_id)
        for query, gen_len in zip(batch["input_ids"], lengths):
            gen_kwargs["max_new_tokens"] = int(gen_len)
            responses.append(trainer.generate(query, **gen_kwargs).squeeze()[-int(gen_len):])
        batch["response"] = [tokenizer.decode(r.squeeze()) for r in responses]
        t1 = time.perf_counter()
        inputs = reward_tok(batch["response"], padding=True, truncation=True, return_tensors="pt").to(device)
        rewards = [torch.tensor(x) for x in reward_model(**inputs).logits.float()[:, reward_index].tolist()]
        t2 = time.perf_counter()
        stats = trainer.step(batch["input_ids"], responses, rewards)
        phases = [t1 - t0, t2 - t1, time.perf_counter() - t2]
    trainer.log_stats(stats, batch, rewards)
    sync(device)
    return {"step": time.perf_counter() - t0, **dict(zip(PHASES, phases)), "tokens": sum(len(r) for r in responses),
            **{k.split("/")[-1]: float(v) for k, v in stats.items() if k.startswith("time/ppo/")}}


def summarise(name, loop, records, args, opts, setup, variant, device, peak, truncated, warmup):
    if not records:
        return {"name": name, "loop": loop, "error": "no step measured within the time budget"}
    med = records[sorted(range(len(records)), key=lambda i: records[i]["step"])[(len(records) - 1) // 2]]
    result = {  # med: the lower median, a real step, so its phase split adds up
        "name": name, "kind": "ppo", "config": opts.size, "loop": loop, "device": str(device),
        **{k: getattr(args, k) for k in ("dtype", "batch_size", "mini_batch_size", "ppo_epochs")},
        "context_tokens": [args.min_context_tokens, args.max_context_tokens],
        "new_tokens": [args.min_new_tokens, args.max_new_tokens],
        "num_shared_layers": setup.num_shared_layers, "gradient_checkpointing": bool(variant["gc"]),
        "reference": "trl create_reference_model (full copy)" if variant["ref"] == "trl" else "shared storage",
        "optimize_device_cache": bool(variant["cache"]),
        "default_settings": settings_of(variant) == DEFAULT_SETTINGS and all(
            getattr(args, k) == getattr(DEFAULTS, k) for k in DEFAULT_ARGS),
        "parameters": setup.parameters, "trainable_parameters": setup.trainable,
        "reference_own_parameters": setup.reference_own, "weights_bytes": setup.weights_bytes,
        "build_seconds": round(setup.build_seconds, 3), "warmup_steps": warmup, "measured_steps": len(records),
        "truncated": truncated, "median": {k: med[k] for k in ("step", *PHASES)},
        "median_optimize_split": {k: v for k, v in med.items() if k not in ("step", *PHASES, "tokens")},
        "median_tokens": med["tokens"], "episodes_per_second": args.batch_size / med["step"],
        "generated_tokens_per_second": med["tokens"] / med["step"],
        "steps": records, "peak_memory_bytes": peak, "memory_kind": memory_kind(device)}
    if loop != "study":  # detoxify_ppo's default run: one pass over the training rows (all kept, 20% held out)
        steps = (RTP_ROWS - math.ceil(0.2 * RTP_ROWS)) // args.batch_size
        result["projection_all_rows"] = {"kept_rows": RTP_ROWS, "steps": steps, "hours": steps * med["step"] / 3600,
                                         "formula": "floor((K - ceil(0.2 K)) / batch) x median step seconds"}
    return result


def run_variant(args, opts, config, tokenizer, reward, device, variant, loops, deadline, warmup, steps):
    """Build one setup, run warm-up + measured steps of each loop, interleaved step by step (same load for all)."""
    started = time.perf_counter()
    free_memory(device)
    setup = Setup(args, opts, config, tokenizer, device, variant)
    label, rng = variant_label(variant, setup), np.random.default_rng(args.seed)
    records, peaks, active = {loop: [] for loop in loops}, dict.fromkeys(loops, 0), {}
    truncated, iteration_seconds = False, 0.0
    for i in range(warmup + steps):
        if i > 0 and any(records.values()) and (
                min(started + opts.variant_budget, deadline) - time.perf_counter() < 1.2 * iteration_seconds):
            truncated = True
            break
        t_iter = time.perf_counter()
        # every loop gets the same queries and lengths (the same work), in an order that rotates
        batch, lengths = make_batch(rng, tokenizer, args, step=i + 1)
        for loop in loops[i % len(loops):] + loops[:i % len(loops)]:
            batch = {"input_ids": list(batch["input_ids"]), "query": list(batch["query"])}  # the steps add keys
            reset_peak(device)
            # the study's loop and ours-plain run trl's PPOTrainer as it is: no speed-up meanwhile
            with setup.trainer.speedups_only() if loop != "ours" else contextlib.nullcontext():
                active[loop] = [SPEEDUPS[s] for s in SPEEDUPS if s in setup.trainer.speedups]
                record = timed_step(loop, setup, tokenizer, reward, batch, lengths, i + 1, device)
            peaks[loop] = max(peaks[loop], peak_bytes(device))
            if i >= warmup:
                records[loop].append({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()})
            print(f"  {opts.size} {label} {loop} {'warm-up' if i < warmup else 'step'} {i + 1}: " + ", ".join(
                f"{k} {record[k]:.3f} s" for k in ("step", *PHASES)), flush=True)
        iteration_seconds = time.perf_counter() - t_iter
    results = [summarise(f"{opts.size}/{label}/{loop}", loop, records[loop], args, opts, setup, variant, device,
                         peaks[loop], truncated, warmup) for loop in loops]
    by_loop = {r["loop"]: r for r in results if "error" not in r}
    for loop, r in by_loop.items():
        r["speedups"] = active[loop]  # the speed-ups on while it ran
        if "study" in by_loop and loop != "study":
            r["speedup_vs_study"] = r["episodes_per_second"] / by_loop["study"]["episodes_per_second"]
            # per interleaved iteration (same load for both): a steadier ratio on a shared machine
            pairs = [b["step"] / a["step"] for a, b in zip(records[loop], records["study"])]
            r["speedup_vs_study_paired"] = {"median": float(np.median(pairs)), "min": min(pairs), "max": max(pairs)}
    if "ours" in by_loop and "ours-plain" in by_loop:
        by_loop["ours"]["speedup_vs_plain"] = (by_loop["ours"]["episodes_per_second"]
                                               / by_loop["ours-plain"]["episodes_per_second"])
    model_ref = setup.model_ref
    setup.close(device)
    for r in results:
        r.update(variant=label, seconds_total=round(time.perf_counter() - started, 2), freed=model_ref() is None)
    return results


# trainer.step's speed-ups, added one by one; the head hook only acts in generate, so it is off throughout
ABLATION = [("trl step", ()), ("+ frozen-prefix cache", ("prefix",)), ("+ response-only logits", ("prefix", "logits")),
            ("+ fused Adam", ("prefix", "logits", "adam"))]


def run_optimize_ablation(args, opts, config, tokenizer, device, rounds, deadline=float("inf")):
    """trainer.step alone on one fixed batch under trainer.speedups_only(ABLATION's names), round-robin."""
    started = time.perf_counter()
    free_memory(device)
    setup = Setup(args, opts, config, tokenizer, device, parse_variant("", args, opts))
    batch, lengths = make_batch(np.random.default_rng(args.seed), tokenizer, args)
    responses = detoxify_ppo.sample_responses(setup.trainer, tokenizer, batch["input_ids"], lengths)
    scores = [torch.tensor(float(x)) for x in np.random.default_rng(args.seed).normal(size=len(responses))]
    times, round_seconds = {name: [] for name, _ in ABLATION}, 0.0
    for r in range(rounds + 1):  # round 0 warms up
        if r > 1 and time.perf_counter() + 1.2 * round_seconds > deadline:
            break  # keep the rounds done
        t_round = time.perf_counter()
        for name, names in ABLATION:
            with setup.trainer.speedups_only(names):
                sync(device)
                t0 = time.perf_counter()
                setup.trainer.step(batch["input_ids"], responses, scores)
                sync(device)
            if r:
                times[name].append(round(time.perf_counter() - t0, 5))
            print(f"  {opts.size} ablation round {r} {name}: {time.perf_counter() - t0:.3f} s", flush=True)
        round_seconds = time.perf_counter() - t_round
    base = times["trl step"]
    result = {"name": f"{opts.size}/optimize-ablation", "kind": "optimize-ablation", "config": opts.size,
              "device": str(device), **{k: getattr(args, k) for k in ("dtype", "batch_size", "mini_batch_size",
                                                                      "ppo_epochs")},
              "num_shared_layers": setup.num_shared_layers, "rounds": len(base),
              "response_tokens": int(sum(len(x) for x in responses)),
              "steps": {name: {"seconds": t, "median": float(np.median(t)),
                               "paired_speedup_median": float(np.median([b / x for b, x in zip(base, t)]))}
                        for name, t in times.items()}}
    setup.close(device)
    return dict(result, seconds_total=round(time.perf_counter() - started, 2))


def run_eval(args, opts, config, reward_model, device):
    """evaluate_toxicity.py's own generate() and toxicity measurement on random prompts; samples/s."""
    import evaluate_toxicity
    from detox_common import resolve_dtype

    started, defaults = time.perf_counter(), evaluate_toxicity.Args  # its batch sizes
    dtype = resolve_dtype("auto", device)  # evaluate_toxicity's default: bfloat16 on GPU, float32 on CPU
    tokenizer = random_models.policy_tokenizer(config.vocab_size)
    tokenizer.padding_side = "left"  # as evaluate_toxicity.load_causal_lm sets
    torch.manual_seed(args.seed)
    model = random_models.build_policy(config, device, dtype).eval()
    classifier_dir = os.path.join(opts.workdir, "classifier")
    # saved in float32: on CPU the measurement loads it as saved, as it would the real classifier
    copy.deepcopy(reward_model).float().save_pretrained(classifier_dir)
    random_models.reward_tokenizer(reward_model.config.vocab_size,
                                   reward_model.config.max_position_embeddings - 2).save_pretrained(classifier_dir)
    toxicity = evaluate_toxicity.load_toxicity_measurement(
        os.path.join(evaluate_toxicity.HERE, "measurements", "toxicity"), classifier_dir, device,
        cache_dir=os.path.join(opts.workdir, ".evaluate_cache"), batch_size=defaults.score_batch_size)
    rng, eos = np.random.default_rng(args.seed), tokenizer.eos_token_id
    prompts = [rng.integers(0, eos, size=n).tolist() for n in rng.integers(10, 101, size=opts.eval_samples)]
    warm = evaluate_toxicity.generate(model, tokenizer, prompts[:2], 1, 4, 2, desc="warm-up")  # both, once
    toxicity.compute(predictions=[tokenizer.decode(s[0], skip_special_tokens=True) for s in warm], toxic_label="hate")
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    new_ids = evaluate_toxicity.generate(model, tokenizer, prompts, 1, args.max_new_tokens, defaults.batch_size,
                                         desc="eval")
    texts = [tokenizer.decode(s[0], skip_special_tokens=True) for s in new_ids]
    sync(device)
    t1 = time.perf_counter()
    scores = toxicity.compute(predictions=texts, toxic_label="hate")["toxicity"]
    sync(device)
    t2 = time.perf_counter()
    peak, tokens = peak_bytes(device), sum(len(s[0]) for s in new_ids)
    del model, toxicity
    free_memory(device)
    return {"name": f"{opts.size}/eval", "kind": "eval", "config": opts.size, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "samples": len(scores), "batch_size": defaults.batch_size,
            "score_batch_size": defaults.score_batch_size, "prompt_tokens": [10, 100],
            "max_new_tokens": args.max_new_tokens, "generate_seconds": t1 - t0, "score_seconds": t2 - t1,
            "seconds": t2 - t0, "samples_per_second": len(scores) / (t2 - t0), "generated_tokens": tokens,
            "generated_tokens_per_second": tokens / (t1 - t0), "peak_memory_bytes": peak,
            "memory_kind": memory_kind(device),
            "code_path": "evaluate_toxicity.generate + evaluate_toxicity.load_toxicity_measurement(...).compute",
            "seconds_total": round(time.perf_counter() - started, 2)}


# ---------------------------------------------------------------------------------------------- output and main
def write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def table(results):
    """render.py's tables of these results (the sections they fill)."""
    kinds = {r.get("kind") for r in results}
    tables = [render.ppo_table(results) * bool(kinds - {"eval", "optimize-ablation"}),
              render.ablation_table(results) * ("optimize-ablation" in kinds),
              render.eval_table(results) * ("eval" in kinds)]
    return "\n\n".join("\n".join(rows) for rows in tables if rows)


def guarded(record, device, name, kind, measure):
    """Record measure()'s results; a failure (out of memory, a script mid-edit) is recorded and loses nothing else."""
    try:
        for result in measure():
            record(result)
    except (torch.cuda.OutOfMemoryError, SystemExit, Exception) as e:
        message = str(e).splitlines()[0] if str(e) else ""
        what = "CUDA out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
        loop = {"loop": "ours"} if kind == "ppo" else {}
        record({"name": name, "kind": kind, **loop, "error": f"{what}: {message}"})
        print(f"  {name}: {what}: {message}", flush=True)
        free_memory(device)


def main(argv=None):
    args, opts = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + (opts.deadline or 1e9)
    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.eval_samples = opts.eval_samples or (400 if is_cuda(device) else 64)
    opts.json = opts.json or os.path.join(ROOT, "results", f"bench_ppo_{opts.size}_{torch.device(device).type}.json")
    workdir = tempfile.TemporaryDirectory(prefix="bench_ppo_")  # removed when main returns
    opts.workdir = args.output_dir = workdir.name  # trl's logging dir; the evaluation's classifier and cache
    detoxify_ppo.check_args(args)  # detoxify_ppo's own checks of its options
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data = {"benchmark": "benchmarks/bench_ppo.py", "study": STUDY, "runs": [], "results": []}
    if opts.append and os.path.exists(opts.json):
        with open(opts.json) as f:
            data = json.load(f)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__, ROOT), *argv])
    data["runs"].append({"command": command, "machine": machine_info(device)})
    write_json(opts.json, data)
    machine = data["runs"][-1]["machine"]
    print(f"bench_ppo: {opts.size} on {machine.get('gpu', machine['cpu'])} ({device}), writing {opts.json}", flush=True)
    own = []

    def record(result):
        result["run"] = len(data["runs"]) - 1
        data["results"].append(result)
        own.append(result)
        write_json(opts.json, data)  # after every result: a later crash or time-out keeps it

    config = random_models.policy_config(opts.size)
    tokenizer = random_models.policy_tokenizer(config.vocab_size)
    reward_tok, reward_model = random_models.build_reward(  # one classifier for every loop
        "tiny" if opts.size.startswith("tiny") else "roberta-base", device,
        detoxify_ppo.reward_dtype(args.reward_dtype, torch.device(device)))
    reward = (reward_tok, reward_model, 0)  # index 0 = "nothate", the study's raw logit
    last_variant_seconds = 0.0
    for n, variant in enumerate([parse_variant(v, args, opts) for v in ["", *opts.variant]]):
        name = f"{opts.size}/{variant_label(variant)}"
        # a variant that cannot finish before the deadline (judged by the last one) is not started
        if deadline - time.perf_counter() < max(0.8 * last_variant_seconds, 0):
            record({"name": name, "loop": "ours", "error": "skipped: run deadline reached"})
            continue
        t_variant = time.perf_counter()
        loops = ["ours-plain"] if variant["plain"] else ["ours", *["ours-plain"] * (opts.plain and n == 0),
                                                         *["study"] * (opts.baseline and n == 0)]
        steps = variant["steps"] or (opts.variant_steps if n else None) or args.steps
        warmup = next(w for w in (variant["warmup"], opts.variant_warmup if n else None, opts.warmup) if w is not None)
        guarded(record, device, name, "ppo", lambda: run_variant(
            args, opts, config, tokenizer, reward, device, variant, loops, deadline, warmup, steps))
        last_variant_seconds = time.perf_counter() - t_variant
        print(table(own[-len(loops):]), flush=True)
    if opts.optimize_ablation and time.perf_counter() < deadline:
        guarded(record, device, f"{opts.size}/optimize-ablation", "optimize-ablation", lambda: [run_optimize_ablation(
            args, opts, config, tokenizer, device, opts.optimize_ablation, deadline)])
    if opts.eval and time.perf_counter() > deadline:
        record({"name": f"{opts.size}/eval", "kind": "eval", "error": "skipped: run deadline reached"})
    elif opts.eval:
        guarded(record, device, f"{opts.size}/eval", "eval", lambda: [run_eval(args, opts, config, reward_model,
                                                                               device)])
    print(f"\n{table(own)}\nwrote {opts.json} in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
