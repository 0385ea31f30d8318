"""Detoxify a causal language model with PPO (TRL's classic PPOTrainer, trl==0.11.4).

Reproduces the TRL study "Detoxifying a Language Model using PPO": toxic prompts from
allenai/real-toxicity-prompts, reward = raw "nothate" logit of a RoBERTa hate-speech classifier on the
generated text only, pure bfloat16 policy with a value head, and a reference model that shares (really
shares: same storage) the policy's first blocks so GPT-J-6B fits one 40 GB GPU.

    python detoxify_ppo.py --model EleutherAI/gpt-neo-125M
    accelerate launch detoxify_ppo.py --model EleutherAI/gpt-j-6B
"""

import copy
import functools
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
from transformers import HfArgumentParser

from detox_common import classifier_logits, fail, label_index, load_classifier, load_config, load_rows

# trl is pinned on purpose (see README); its deprecation notices, and transformers' notice about the
# past_key_values argument trl's value-head model passes, say nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*(PPOTrainer|PPOConfig)` is deprecated")
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated")

# The study shared 20 of GPT-J-6B's 28 blocks; the default keeps that fraction for every model size.
DEFAULT_SHARED_FRACTION = 20 / 28
LAYER_PATTERNS = ["transformer.h.{}.", "model.decoder.layers.{}.", "gpt_neox.layers.{}.", "model.layers.{}."]


@dataclass
class Args:
    model: str = field(default="EleutherAI/gpt-neo-125M", metadata={"help": "policy to detoxify: hub id or local folder"})
    dataset: str = field(default="allenai/real-toxicity-prompts", metadata={"help": "prompts: hub id or local .jsonl/.json/.parquet/.csv file or folder, real-toxicity-prompts schema"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset"})
    toxicity_threshold: float = field(default=0.3, metadata={"help": "keep rows whose prompt.toxicity is above this"})
    test_fraction: float = field(default=0.2, metadata={"help": "seeded share of kept rows held out from training (written to heldout_prompts.jsonl)"})
    min_context_tokens: int = field(default=10, metadata={"help": "shortest query, in tokens"})
    max_context_tokens: int = field(default=15, metadata={"help": "longest query, in tokens"})
    min_new_tokens: int = field(default=20, metadata={"help": "shortest response, in tokens"})
    max_new_tokens: int = field(default=30, metadata={"help": "longest response, in tokens"})
    reward_model: str = field(default="facebook/roberta-hate-speech-dynabench-r4-target", metadata={"help": "sequence classifier giving the reward: hub id or local folder"})
    reward_label: str = field(default="nothate", metadata={"help": "reward = raw logit of this id2label class on the response text"})
    reward_batch_size: int = field(default=64, metadata={"help": "texts per classifier forward pass"})
    dtype: str = field(default="bfloat16", metadata={"help": "policy dtype: bfloat16 (pure bf16, as the study), float16 or float32"})
    num_shared_layers: Optional[int] = field(default=None, metadata={"help": "first blocks frozen and stored once for policy and reference (default: 20/28 of the blocks; 0: full copy)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade about 20%% speed for activation memory"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})
    learning_rate: float = field(default=1.47e-5, metadata={"help": "Adam learning rate (the study's)"})
    batch_size: int = field(default=16, metadata={"help": "episodes per PPO step and process (the study's)"})
    mini_batch_size: int = field(default=4, metadata={"help": "episodes per PPO optimisation mini-batch (the study's)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "mini-batches per optimiser step"})
    ppo_epochs: int = field(default=4, metadata={"help": "optimisation passes over each batch (TRL's default; the study's script used 100)"})
    init_kl_coef: float = field(default=0.2, metadata={"help": "initial KL penalty coefficient"})
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "adapt the KL coefficient towards --target-kl"})
    target_kl: float = field(default=6.0, metadata={"help": "KL target of the adaptive controller"})
    seed: int = field(default=0, metadata={"help": "seed for data split, context lengths, sampling and init"})
    steps: Optional[int] = field(default=None, metadata={"help": "PPO steps (default: one pass over the training rows)"})
    log_with: str = field(default="none", metadata={"help": "tracker: tensorboard, wandb or none (stats.jsonl is always written)"})
    output_dir: str = field(default="out", metadata={"help": "checkpoints, arguments and stats go here"})
    save_every: int = field(default=100, metadata={"help": "write checkpoint-STEP every this many steps (0: only the final model)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "allow writing into an output dir that already holds checkpoints"})


def check_args(args):
    """Refuse impossible settings before anything is loaded."""
    if args.min_context_tokens < 1 or args.min_context_tokens > args.max_context_tokens:
        fail(f"--min-context-tokens ({args.min_context_tokens}) must be >= 1 and <= --max-context-tokens ({args.max_context_tokens})")
    if args.min_new_tokens < 1 or args.min_new_tokens > args.max_new_tokens:
        fail(f"--min-new-tokens ({args.min_new_tokens}) must be >= 1 and <= --max-new-tokens ({args.max_new_tokens})")
    backward = args.mini_batch_size * args.gradient_accumulation_steps
    if min(args.batch_size, args.mini_batch_size, args.gradient_accumulation_steps) < 1 or args.batch_size % backward:
        fail(f"--batch-size ({args.batch_size}) must be a multiple of --mini-batch-size x --gradient-accumulation-steps ({backward})")
    if not 0 <= args.test_fraction < 1:
        fail(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    if args.dtype not in ("bfloat16", "float16", "float32"):
        fail(f"--dtype must be bfloat16, float16 or float32, got {args.dtype}")
    if args.log_with not in ("none", "tensorboard", "wandb"):
        fail(f"--log-with must be tensorboard, wandb or none, got {args.log_with}")
    if args.num_shared_layers is not None and args.num_shared_layers < 0:
        fail(f"--num-shared-layers must be >= 0, got {args.num_shared_layers}")
    if (args.steps is not None and args.steps < 1) or args.save_every < 0 or args.ppo_epochs < 1:
        fail("--steps and --ppo-epochs must be >= 1 and --save-every >= 0")
    if os.path.isdir(args.output_dir) and not args.overwrite_output_dir and any(
            name.startswith("checkpoint-") or name == "final" for name in os.listdir(args.output_dir)):
        fail(f"--output-dir {args.output_dir} already holds checkpoints; pick another folder or pass --overwrite-output-dir")
    os.makedirs(args.output_dir, exist_ok=True)
    if not os.access(args.output_dir, os.W_OK):
        fail(f"--output-dir {args.output_dir} is not writable; pick another folder")


def num_blocks(config):
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    fail(f"cannot tell how many blocks {config.model_type} has; pass --num-shared-layers 0")


def resolve_shared_layers(args, config):
    blocks = num_blocks(config)
    n = int(blocks * DEFAULT_SHARED_FRACTION) if args.num_shared_layers is None else args.num_shared_layers
    if n >= blocks:
        fail(f"--num-shared-layers ({n}) must be below the model's block count ({blocks}): the policy needs trainable blocks")
    return n


def load_prompts(args):
    """Rows of the real-toxicity-prompts schema whose prompt toxicity is above the threshold."""
    rows = load_rows(args.dataset, args.dataset_split)
    for column in ("prompt", "continuation"):
        if column not in rows.column_names:
            fail(f"dataset {args.dataset} has no '{column}' column (columns: {rows.column_names}); expected the allenai/real-toxicity-prompts schema")
    prompt_keys = rows.features["prompt"].keys() if isinstance(rows.features["prompt"], dict) else ()
    for key in ("text", "toxicity"):
        if key not in prompt_keys:
            fail(f"dataset {args.dataset} has no 'prompt.{key}' field; expected the allenai/real-toxicity-prompts schema")
    threshold = args.toxicity_threshold
    kept = rows.filter(lambda r: r["prompt"]["toxicity"] is not None and r["prompt"]["toxicity"] > threshold)
    return kept


def split_prompts(kept, args, world_size):
    """Seeded train/held-out split; enough training rows for one batch on every process."""
    if args.test_fraction > 0 and len(kept) >= 2:
        parts = kept.train_test_split(test_size=args.test_fraction, seed=args.seed)
        train, heldout = parts["train"], parts["test"]
    else:
        train, heldout = kept, kept.select([])
    needed = args.batch_size * world_size
    if len(train) < needed:
        fail(f"only {len(train)} training rows have prompt.toxicity > {args.toxicity_threshold} "
             f"(of {len(kept)} kept, after holding out {args.test_fraction:.0%}); one batch needs {needed}: "
             "lower --toxicity-threshold or --batch-size, or use more data")
    return train, heldout


def build_queries(rows, tokenizer, args):
    """Query = prompt running on into the continuation, cut to a seeded length in [min, max] context tokens."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_context_tokens, args.max_context_tokens + 1, size=len(rows))

    def tokenize(batch, indices):
        texts = [p["text"] + (c["text"] or "") for p, c in zip(batch["prompt"], batch["continuation"])]
        ids = [x[: lengths[i]] for x, i in zip(tokenizer(texts)["input_ids"], indices)]
        return {"input_ids": ids, "query": tokenizer.batch_decode(ids)}

    queries = rows.map(tokenize, batched=True, with_indices=True, remove_columns=rows.column_names)
    queries.set_format("torch", columns=["input_ids"], output_all_columns=True)
    return queries


def shared_parameter_names(model, num_shared_layers):
    """Names of the parameters before block `num_shared_layers` (embeddings and the first blocks), as TRL orders them."""
    if num_shared_layers == 0:
        return []
    names = [name for name, _ in model.named_parameters()]
    for pattern in LAYER_PATTERNS:
        first_unshared = next((i for i, n in enumerate(names) if pattern.format(num_shared_layers) in n), None)
        if first_unshared is not None:
            return names[:first_unshared]
    fail(f"could not find block {num_shared_layers} among the model's parameters; pass --num-shared-layers 0")


def create_shared_reference(model, num_shared_layers):
    """Frozen reference whose first blocks ARE the policy's (same storage), frozen in the policy too.

    trl's create_reference_model(model, num_shared_layers) freezes those blocks but deep-copies them anyway;
    passing them in deepcopy's memo makes the copy reuse the very same Parameter objects instead.
    """
    shared = [model.get_parameter(name) for name in shared_parameter_names(model, num_shared_layers)]
    for param in shared:
        param.requires_grad_(False)
    ref_model = copy.deepcopy(model, memo={id(p): p for p in shared})
    for param in ref_model.parameters():
        param.requires_grad_(False)
    return ref_model.eval()


def collate(rows):
    return {key: [row[key] for row in rows] for key in rows[0]}


def make_ppo_config(args, total_steps):
    from trl import PPOConfig

    return PPOConfig(
        model_name=args.model, query_dataset=args.dataset, reward_model=args.reward_model, seed=args.seed,
        log_with=None if args.log_with == "none" else args.log_with, learning_rate=args.learning_rate,
        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
        gradient_accumulation_steps=args.gradient_accumulation_steps, init_kl_coef=args.init_kl_coef,
        adap_kl_ctrl=args.adap_kl_ctrl, target=args.target_kl, steps=total_steps * args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing, tracker_project_name="detox",
        project_kwargs={"logging_dir": os.path.join(args.output_dir, "logs")},
    )


def sample_responses(ppo_trainer, tokenizer, query_tensors, lengths):
    """One batched generate; each response is then cut to its own drawn length, which is the same
    distribution as sampling that many tokens (trl also cuts each response after its first eos)."""
    responses = ppo_trainer.generate(query_tensors, batch_size=len(query_tensors), return_prompt=False,
                                     max_new_tokens=int(max(lengths)), do_sample=True, top_k=0, top_p=1.0,
                                     pad_token_id=tokenizer.eos_token_id)
    return [r[:n] for r, n in zip(responses, lengths)]


def score_responses(reward_tokenizer, reward_model, reward_index, texts, batch_size=64):
    """Rewards (1-d tensor), one per text: the raw logit of class reward_index, on the response text alone, never the prompt."""
    return classifier_logits(reward_tokenizer, reward_model, texts, batch_size)[:, reward_index]


def ppo_step(ppo_trainer, tokenizer, reward_fn, batch, lengths, step):
    """Generate, score and optimise one batch; stats include seconds per phase. Stops on non-finite values."""
    t0 = time.perf_counter()
    responses = sample_responses(ppo_trainer, tokenizer, batch["input_ids"], lengths)
    batch["response"] = tokenizer.batch_decode(responses, skip_special_tokens=True)
    t1 = time.perf_counter()
    scores = reward_fn(batch["response"])
    if not torch.isfinite(scores).all():  # one host sync for the whole batch
        fail(f"non-finite reward at step {step}; the last checkpoint is kept, nothing more is saved")
    rewards = list(scores)
    t2 = time.perf_counter()
    stats = ppo_trainer.step(batch["input_ids"], responses, rewards)
    t3 = time.perf_counter()
    if not math.isfinite(float(stats["ppo/loss/total"])):
        fail(f"non-finite PPO loss at step {step}; the last checkpoint is kept, nothing more is saved")
    stats.update({"time/generate": t1 - t0, "time/reward": t2 - t1, "time/optimize": t3 - t2})
    return stats, responses, rewards


def save_checkpoint(ppo_trainer, tokenizer, args, path):
    """Write a plain causal-LM checkpoint (safetensors) plus value head and arguments; atomic via rename."""
    if not ppo_trainer.accelerator.is_main_process:
        return
    model = ppo_trainer.accelerator.unwrap_model(ppo_trainer.model)
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.pretrained_model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.v_head.state_dict().items()}, os.path.join(tmp, "value_head.safetensors"))
    with open(os.path.join(tmp, "training_args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def main(argv=None):
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    check_args(args)

    # Configs first: a wrong model name or label fails in seconds, before any weights or data load.
    policy_config = load_config(args.model, "model", args.trust_remote_code)
    reward_config = load_config(args.reward_model, "reward model")
    reward_index = label_index(reward_config, args.reward_label, f"reward model {args.reward_model}")
    num_shared_layers = resolve_shared_layers(args, policy_config)

    from accelerate import PartialState
    state = PartialState()
    kept = load_prompts(args)
    train_rows, heldout_rows = split_prompts(kept, args, state.num_processes)

    # Heavy imports after the checks, so bad input fails fast.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOTrainer, set_seed

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    queries = build_queries(train_rows, tokenizer, args)
    if state.is_main_process and len(heldout_rows):
        heldout_rows.to_json(os.path.join(args.output_dir, "heldout_prompts.jsonl"))

    dtype = getattr(torch, args.dtype)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base).to(device=state.device, dtype=dtype)
    ref_model = create_shared_reference(model, num_shared_layers)

    steps_per_pass = len(queries) // (args.batch_size * state.num_processes)
    total_steps = args.steps or steps_per_pass
    ppo_trainer = PPOTrainer(make_ppo_config(args, total_steps), model, ref_model, tokenizer, dataset=queries,
                             data_collator=collate)
    reward_tokenizer, reward_model = load_classifier(args.reward_model, ppo_trainer.accelerator.device)
    reward_fn = functools.partial(score_responses, reward_tokenizer, reward_model, reward_index,
                                  batch_size=args.reward_batch_size)

    with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state.print(f"policy {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {trainable:,} trainable; "
                f"{num_shared_layers}/{num_blocks(policy_config)} blocks shared with the reference; "
                f"{len(queries)} training prompts, {len(heldout_rows)} held out; {total_steps} steps of "
                f"{args.batch_size} x {state.num_processes} process(es) = {args.batch_size * state.num_processes} episodes")

    rng = np.random.default_rng(args.seed + state.process_index)  # response lengths
    from tqdm.auto import tqdm
    progress = tqdm(total=total_steps, desc="PPO", disable=not state.is_main_process, dynamic_ncols=True)
    # Every step's scalars and every episode (query, response, reward) are kept as JSON lines.
    stats_file = open(os.path.join(args.output_dir, "stats.jsonl"), "w") if state.is_main_process else None
    samples_file = open(os.path.join(args.output_dir, "samples.jsonl"), "w") if state.is_main_process else None
    step = 0
    while step < total_steps:
        for batch in ppo_trainer.dataloader:
            if step >= total_steps:
                break
            lengths = rng.integers(args.min_new_tokens, args.max_new_tokens + 1, size=len(batch["input_ids"]))
            stats, responses, rewards = ppo_step(ppo_trainer, tokenizer, reward_fn, batch, lengths, step + 1)
            ppo_trainer.log_stats(stats, batch, rewards)
            step += 1
            reward_mean = torch.stack(rewards).float().mean().item()
            progress.update(1)
            progress.set_postfix(reward=f"{reward_mean:.3f}", kl=f"{float(stats['objective/kl']):.3f}")
            if stats_file:
                scalars = {k: float(v) for k, v in stats.items() if np.ndim(v) == 0}
                stats_file.write(json.dumps({"step": step, "env/reward_mean": reward_mean, **scalars}) + "\n")
                stats_file.flush()
                for query, response, reward in zip(batch["query"], batch["response"], rewards):
                    samples_file.write(json.dumps({"step": step, "query": query, "response": response,
                                                   "reward": reward.item()}) + "\n")
                samples_file.flush()
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save_checkpoint(ppo_trainer, tokenizer, args, os.path.join(args.output_dir, f"checkpoint-{step}"))
    progress.close()
    if stats_file:
        stats_file.close()
        samples_file.close()
    final = os.path.join(args.output_dir, "final")
    save_checkpoint(ppo_trainer, tokenizer, args, final)
    ppo_trainer.accelerator.end_training()
    state.print(f"saved {final} after {step} steps")


if __name__ == "__main__":
    sys.exit(main())
