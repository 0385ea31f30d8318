"""Detoxify a causal language model with PPO (TRL's classic PPOTrainer, trl==0.11.4).

Reproduces the TRL study "Detoxifying a Language Model using PPO": toxic prompts from
allenai/real-toxicity-prompts, reward = raw "nothate" logit of a RoBERTa hate-speech classifier on the
generated text only, pure bfloat16 policy with a value head, and a reference model that shares (really
shares: same storage) the policy's first blocks so GPT-J-6B fits one 40 GB GPU. build_ppo_trainer adds the
speed-ups measured in BENCHMARKS.md (fused Adam, frozen-prefix cache, response-only logits).

    python detoxify_ppo.py --model EleutherAI/gpt-neo-125M
    accelerate launch detoxify_ppo.py --model EleutherAI/gpt-j-6B
"""

import contextlib
import copy
import functools
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
from transformers import HfArgumentParser

from detox_common import (CARD_RESULTS_END, CARD_RESULTS_START, DTYPES, classifier_logits, fail, label_index,
                          load_classifier, load_config, load_rows)

# trl is pinned on purpose (see README); its deprecation notices, and transformers' notice about the
# past_key_values argument trl's value-head model passes, say nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*(PPOTrainer|PPOConfig)` is deprecated")
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated")
# Batches are drawn by batch_indices() (seeded, resumable, sharded per process), not by trl's dataloader.
warnings.filterwarnings("ignore", message=r"No dataset is provided")

# The study shared 20 of GPT-J-6B's 28 blocks; the default keeps that fraction for every model size.
DEFAULT_SHARED_FRACTION = 20 / 28
BLOCK_PATHS = ["transformer.h", "model.decoder.layers", "gpt_neox.layers", "model.layers"]  # where the blocks live


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
    reward_dtype: str = field(default="auto", metadata={"help": "classifier dtype: auto (float16 on GPU, bfloat16 on CPU), bfloat16, float16 or float32"})
    dtype: str = field(default="bfloat16", metadata={"help": "policy dtype: bfloat16 (pure bf16, as the study), float16 or float32"})
    num_shared_layers: Optional[int] = field(default=None, metadata={"help": "first blocks frozen and stored once for policy and reference (default: 20/28 of the blocks; 0: full copy)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade about 20%% speed for activation memory"})
    frozen_prefix_cache: bool = field(default=True, metadata={"help": "run the shared frozen blocks once per PPO step, not at each of trl's 2 + ppo_epochs passes (exact)"})
    response_only_logits: bool = field(default=True, metadata={"help": "in trl's later passes, compute LM-head logits only at the response positions trl reads"})
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
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest K checkpoint-STEP folders"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "a checkpoint-STEP folder to resume from, or 'auto' for the newest in --output-dir"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "allow writing into an output dir that already holds checkpoints"})
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters (plus the value head); the reference is the same model with adapters disabled"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: Optional[list[str]] = field(default=None, metadata={"help": "modules to adapt (default: peft's choice for the architecture, q_proj v_proj for GPT-Neo/GPT-J)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "load the base model in 8 bit through bitsandbytes (GPU, with --use-peft)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "load the base model in 4 bit through bitsandbytes (GPU, with --use-peft)"})
    merge_adapters: bool = field(default=False, metadata={"help": "also write final-merged/: the adapters merged into a plain model"})
    push_to_hub: Optional[str] = field(default=None, metadata={"help": "upload the final model, tokenizer and card to this hub repo (owner/name)"})
    config: Optional[str] = field(default=None, metadata={"help": "YAML file giving options; command-line flags win"})


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
    if args.dtype not in DTYPES:
        fail(f"--dtype must be bfloat16, float16 or float32, got {args.dtype}")
    if args.reward_dtype != "auto" and args.reward_dtype not in DTYPES:
        fail(f"--reward-dtype must be auto, {', '.join(DTYPES)}, got {args.reward_dtype}")
    if args.log_with not in ("none", "tensorboard", "wandb"):
        fail(f"--log-with must be tensorboard, wandb or none, got {args.log_with}")
    if args.num_shared_layers is not None and args.num_shared_layers < 0:
        fail(f"--num-shared-layers must be >= 0, got {args.num_shared_layers}")
    if (args.steps is not None and args.steps < 1) or args.save_every < 0 or args.ppo_epochs < 1:
        fail("--steps and --ppo-epochs must be >= 1 and --save-every >= 0")
    if (args.load_in_8bit or args.load_in_4bit) and not args.use_peft:
        fail("--load-in-8bit/--load-in-4bit train only adapters: add --use-peft")
    if args.load_in_8bit and args.load_in_4bit:
        fail("choose one of --load-in-8bit and --load-in-4bit")
    if (args.load_in_8bit or args.load_in_4bit) and not torch.cuda.is_available():
        fail("--load-in-8bit/--load-in-4bit need a CUDA GPU (bitsandbytes); on CPU use --use-peft alone")
    if args.merge_adapters and not args.use_peft:
        fail("--merge-adapters needs --use-peft (without it the saved model is already plain)")
    if args.use_peft and min(args.lora_r, args.lora_alpha) < 1:
        fail("--lora-r and --lora-alpha must be >= 1")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        fail(f"--save-total-limit must be >= 1, got {args.save_total_limit}")
    if os.path.isdir(args.output_dir) and not args.overwrite_output_dir and not args.resume_from_checkpoint and any(
            name.startswith("checkpoint-") or name == "final" for name in os.listdir(args.output_dir)):
        fail(f"--output-dir {args.output_dir} already holds checkpoints; pick another folder or pass --overwrite-output-dir")
    try:  # a real write: os.access says yes to root even on a read-only mount
        os.makedirs(args.output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.output_dir):
            pass
    except OSError as e:
        fail(f"--output-dir {args.output_dir} is not writable ({e.strerror}); pick another folder")


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
    for path in BLOCK_PATHS:
        first_unshared = next((i for i, n in enumerate(names) if f"{path}.{num_shared_layers}." in n), None)
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


def load_peft_policy(args, dtype, device):
    """Base model (optionally 8/4-bit) with fresh LoRA adapters and a value head; only those two train."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import AutoModelForCausalLMWithValueHead

    quantization = None
    if args.load_in_8bit or args.load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_8bit=args.load_in_8bit, load_in_4bit=args.load_in_4bit,
                                          bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, quantization_config=quantization,
                                                trust_remote_code=args.trust_remote_code,
                                                device_map={"": device} if quantization else None)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_target_modules, bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora)
    if quantization is None:
        model = model.to(device=device, dtype=dtype)
    else:
        model.v_head.to(device=device, dtype=dtype)
    return model


@contextlib.contextmanager
def frozen_models_skip_ddp():
    """trl prepares the frozen reference with accelerator.prepare; on multi-CPU runs accelerate wraps even a
    model without trainable parameters in DistributedDataParallel, which torch refuses (its multi-GPU path
    already skips such models). Treat a fully frozen model as evaluation-only while the trainer is built."""
    from accelerate import Accelerator

    original = Accelerator.prepare_model

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        frozen = not any(p.requires_grad for p in model.parameters())
        return original(self, model, device_placement=device_placement, evaluation_mode=evaluation_mode or frozen)

    Accelerator.prepare_model = prepare_model
    try:
        yield
    finally:
        Accelerator.prepare_model = original


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


def contiguous_head_input(module, args):
    """Forward pre-hook for the LM head. generate() feeds it hidden_states[:, -1:, :], a strided slice, and torch
    folds [batch, 1, hidden] @ W.T into one matmul only if W requires grad or the input is contiguous; a frozen
    head (gpt-neo ties it to the shared embeddings) instead takes bmm over W expanded to the batch: a copy of
    batch x vocab x hidden elements at every generate (1.2 GB for gpt-neo-125M at batch 16)."""
    return (args[0].contiguous(),) + tuple(args[1:])


class FrozenPrefixCache:
    """Inside PPOTrainer.step, run the shared blocks once per step instead of at every forward call.

    trl's step makes 2 + ppo_epochs forward passes over each row (policy and reference without grad, then the
    optimisation passes): 24 calls per step at the defaults. Blocks 0..N-1 are frozen, shared by policy and
    reference, and run without dropout, so their output for a row is the same in all of them. The policy's
    first pass records block N-1's output per row; in later calls block 0 returns the recorded states and blocks
    1..N-1 pass them on (the embeddings still run: they are cheap). Exact (tests: bit-identical parameters).

    response_only_logits: trl reads the logits only where its mask is 1 (positions predicting response tokens);
    in the calls after the first, the LM head runs on those positions alone and the rest stay zero (never read).

    Later calls find their rows among the recorded ones by token ids and mask (one host sync per call); rows with
    the same tokens get the union of their read positions, so the head covers whichever of them a call holds.
    Nothing changes outside step(); `skip_prefix` and `response_only_logits` can be switched off between steps."""

    def __init__(self, ppo_trainer, num_shared_layers, skip_prefix=True, response_only_logits=True):
        self.num_shared_layers = num_shared_layers
        self.skip_prefix, self.response_only_logits = skip_prefix, response_only_logits
        self.active = False  # inside step()
        self.spans = None  # (query, response) lengths of the step's rows
        self.ids, self.masks, self.hidden = [], [], []  # the first pass's calls: token ids, mask, block N-1 output
        self.table = None  # the step's rows, once all are recorded: ids, masks, hidden, read positions (CPU)
        self.rows = None  # for the current call: (index of each input row among the recorded rows, same on CPU)
        self.capturing = False
        self.tuple_output = True  # gpt-neo blocks return tuples, gpt-j's tensors
        self.hits = self.misses = 0  # forward calls served from the recorded rows / run in full
        self.head_positions = 0  # positions the LM head computed in response-only calls
        unwrap = ppo_trainer.accelerator.unwrap_model
        policy, reference = unwrap(ppo_trainer.model), unwrap(ppo_trainer.ref_model)
        for model in (policy, reference):
            blocks = self.blocks(model)
            for i in range(num_shared_layers):
                blocks[i].forward = self.skipping(blocks[i].forward, first=i == 0)
            head = model.pretrained_model.get_output_embeddings()
            head.forward = self.heading(head.forward)
            model.forward = self.routing(model.forward, capture=model is policy)
        if num_shared_layers:
            self.blocks(policy)[num_shared_layers - 1].register_forward_hook(self.record)
        step = ppo_trainer.step

        @functools.wraps(step)
        def step_with_cache(queries, responses, *args, **kwargs):
            if not (self.skip_prefix or self.response_only_logits):
                return step(queries, responses, *args, **kwargs)
            self.active = True
            self.spans = [(len(q), len(r)) for q, r in zip(queries, responses)]
            try:
                return step(queries, responses, *args, **kwargs)
            finally:  # nothing is kept from one step to the next
                self.active, self.rows, self.capturing = False, None, False
                self.ids, self.masks, self.hidden = [], [], []
                self.spans = self.table = None

        ppo_trainer.step = step_with_cache

    @staticmethod
    def blocks(model):
        for path in BLOCK_PATHS:
            try:
                return model.pretrained_model.get_submodule(path)
            except AttributeError:
                continue
        fail(f"--frozen-prefix-cache does not know the block layout of {type(model.pretrained_model).__name__}; "
             "pass --no-frozen-prefix-cache")

    def record(self, module, args, output):
        if self.capturing and self.skip_prefix:
            self.tuple_output = isinstance(output, tuple)
            self.hidden.append((output[0] if self.tuple_output else output).detach())

    def finish_recording(self):
        """Once per step, after the first pass: the recorded rows as one table, with the positions trl reads."""
        ids, masks = torch.cat(self.ids), torch.cat(self.masks)
        masks_cpu = masks.cpu()
        positions = torch.zeros(masks_cpu.shape, dtype=torch.bool)
        for k, (query, response) in enumerate(self.spans):
            start = int(masks_cpu[k].nonzero()[0]) + query - 1  # as trl: offset by any left padding
            positions[k, start:start + response] = True
        same = ((ids[:, None] == ids[None]).all(-1) & (masks[:, None] == masks[None]).all(-1)).cpu()
        self.table = {"ids": ids, "masks": masks, "hidden": torch.cat(self.hidden) if self.hidden else None,
                      "positions": (same[:, :, None] & positions[None]).any(1)}

    def skipping(self, forward, first):
        def skip_block(hidden_states, *args, **kwargs):
            if self.rows is None or not self.skip_prefix or self.table["hidden"] is None:
                return forward(hidden_states, *args, **kwargs)
            out = self.table["hidden"].index_select(0, self.rows[0]) if first else hidden_states
            return (out, None) if self.tuple_output else out
        return skip_block

    def heading(self, forward):
        def head(hidden_states, *args, **kwargs):
            if self.rows is None or not self.response_only_logits or hidden_states.dim() != 3:
                return forward(hidden_states, *args, **kwargs)
            batch, length = hidden_states.shape[:2]
            read = self.table["positions"][self.rows[1]].flatten().nonzero().squeeze(1)  # on the CPU: no sync
            read = read.to(hidden_states.device, non_blocking=True)
            logits = forward(hidden_states.flatten(0, 1).index_select(0, read), *args, **kwargs)  # [positions, vocab]
            self.head_positions += logits.shape[0]
            out = logits.new_zeros(batch * length, logits.shape[-1]).index_copy(0, read, logits)
            return out.view(batch, length, -1)
        return head

    def lookup(self, input_ids, attention_mask):
        """(rows on the device, rows on the CPU) of this call among the recorded rows, or None."""
        table = self.table
        if table is None or attention_mask is None or table["ids"].shape[1] != input_ids.shape[1]:
            return None
        match = ((input_ids[:, None, :] == table["ids"][None]).all(-1)
                 & (attention_mask[:, None, :] == table["masks"][None]).all(-1))
        rows = match.to(torch.int8).argmax(1)
        found = torch.cat([match.any(1).all().view(1).long(), rows]).cpu()  # the one host sync per call
        return (rows, found[1:]) if found[0] else None

    def routing(self, forward, capture):
        def route(input_ids=None, *args, attention_mask=None, **kwargs):
            if not self.active or input_ids is None:
                return forward(input_ids, *args, attention_mask=attention_mask, **kwargs)
            if capture and not torch.is_grad_enabled() and self.table is None:
                # the policy's first pass, over the step's rows in order: record them all, duplicates too
                self.capturing = True
                self.misses += 1
                self.ids.append(input_ids)
                self.masks.append(attention_mask)
                try:
                    return forward(input_ids, *args, attention_mask=attention_mask, **kwargs)
                finally:
                    self.capturing = False
                    if sum(len(ids) for ids in self.ids) == len(self.spans):
                        self.finish_recording()
            self.rows = self.lookup(input_ids, attention_mask)
            self.hits += self.rows is not None
            self.misses += self.rows is None
            try:
                return forward(input_ids, *args, attention_mask=attention_mask, **kwargs)
            finally:
                self.rows = None
        return route


def checkpoint_while_training(layer, args):
    """Forward pre-hook for checkpointed layers: trl runs every forward pass in eval mode (batched_forward_pass
    calls model.eval()), and transformers checkpoints a layer only in training mode. The layer itself is marked
    training while gradients are on; the dropout modules inside it keep eval mode."""
    layer.training = torch.is_grad_enabled()


def build_ppo_trainer(args, model, ref_model, tokenizer, total_steps, num_shared_layers):
    """trl's PPOTrainer with the measured speed-ups of BENCHMARKS.md: fused Adam (same update as trl's Adam, and
    no foreach temporaries: 3.4 GiB less at GPT-J-6B size), a contiguous LM-head input, and the frozen-prefix cache.
    The hook handle and the cache stay on the trainer as .head_hook and .frozen_prefix_cache."""
    from trl import PPOTrainer

    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=args.learning_rate, fused=device.type in ("cuda", "cpu"))
    with frozen_models_skip_ddp():
        ppo_trainer = PPOTrainer(make_ppo_config(args, total_steps), model, ref_model, tokenizer, optimizer=optimizer)
    head = model.pretrained_model.get_output_embeddings()
    ppo_trainer.head_hook = head.register_forward_pre_hook(contiguous_head_input)
    if args.gradient_checkpointing:  # trl enabled it on the policy's layers; make it happen under trl's eval mode
        for layer in model.modules():
            if getattr(layer, "gradient_checkpointing", False):
                layer.register_forward_pre_hook(checkpoint_while_training)
    ppo_trainer.frozen_prefix_cache = None
    if ref_model is not None and (args.frozen_prefix_cache or args.response_only_logits):
        ppo_trainer.frozen_prefix_cache = FrozenPrefixCache(ppo_trainer, num_shared_layers, args.frozen_prefix_cache,
                                                            args.response_only_logits)
    return ppo_trainer

def sample_responses(ppo_trainer, tokenizer, query_tensors, lengths):
    """One batched generate; each response is then cut to its own drawn length, which is the same
    distribution as sampling that many tokens (trl also cuts each response after its first eos)."""
    responses = ppo_trainer.generate(query_tensors, batch_size=len(query_tensors), return_prompt=False,
                                     max_new_tokens=int(max(lengths)), do_sample=True, top_k=0, top_p=1.0,
                                     pad_token_id=tokenizer.eos_token_id)
    return [r[:n] for r, n in zip(responses, lengths)]


def reward_dtype(args, device):
    """Half precision by default: float16 on GPU (as detox_common.load_classifier), bfloat16 on CPU (half the reward time there)."""
    if args.reward_dtype != "auto":
        return DTYPES[args.reward_dtype]
    return torch.float16 if device.type == "cuda" else torch.bfloat16


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
        fail(f"non-finite reward at step {step}; stopped without saving, the last checkpoint in the output folder "
             "is intact (check --reward-model)")
    rewards = list(scores)
    t2 = time.perf_counter()
    stats = ppo_trainer.step(batch["input_ids"], responses, rewards)
    t3 = time.perf_counter()
    check_finite(stats, step)
    stats.update({"time/generate": t1 - t0, "time/reward": t2 - t1, "time/optimize": t3 - t2})
    return stats, responses, rewards


# What a checkpoint must hold to resume; anything missing or unreadable is reported by name.
CHECKPOINT_FILES = ["config.json", "model.safetensors", "value_head.safetensors", "optimizer.pt", "trainer_state.json",
                    "rng_state_0.pth", "training_args.json"]
# Arguments that decide which batches come in which order: a resumed run must keep them.
DATA_ORDER_ARGS = ["model", "dataset", "dataset_split", "toxicity_threshold", "test_fraction", "min_context_tokens",
                   "max_context_tokens", "min_new_tokens", "max_new_tokens", "batch_size", "seed", "num_shared_layers"]


def batch_indices(step, num_rows, batch_size, num_processes, process_index, seed):
    """Rows of `step` for this process: a seeded permutation per pass, cut into per-process batches.

    The order depends only on (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
    """
    steps_per_pass = num_rows // (batch_size * num_processes)
    epoch, position = divmod(step, steps_per_pass)
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    start = (position * num_processes + process_index) * batch_size
    return order[start:start + batch_size].tolist()


def response_lengths(step, size, args, process_index):
    """Seeded per (step, process): resuming needs no generator state."""
    rng = np.random.default_rng([args.seed, process_index, step])
    return rng.integers(args.min_new_tokens, args.max_new_tokens + 1, size=size)


def estimate_checkpoint_bytes(config, dtype, num_shared_layers, trust_remote_code=False):
    """Weights plus Adam state (two moments of the trainable part), counted on a weightless meta model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    shared_names = set(shared_parameter_names(model, num_shared_layers))
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in shared_names)
    return (total + 2 * trainable) * torch.tensor([], dtype=dtype).element_size()


def check_disk(args, policy_config, num_shared_layers):
    need = estimate_checkpoint_bytes(policy_config, DTYPES[args.dtype], num_shared_layers, args.trust_remote_code)
    free = shutil.disk_usage(args.output_dir).free
    if free < need:
        fail(f"--output-dir {args.output_dir} has {free / 1e9:.2f} GB free but one checkpoint needs about "
             f"{need / 1e9:.2f} GB; free some space or pick another folder")


def check_finite(stats, step):
    """Stop on a non-finite loss, KL or log-probability; nothing after the last good checkpoint is saved."""
    for key in ("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value", "objective/kl", "objective/logprobs",
                "objective/ref_logprobs"):
        if key in stats and not np.isfinite(np.asarray(stats[key], dtype=np.float64)).all():
            fail(f"non-finite {key} at step {step}; stopped without saving, the last checkpoint in the output "
                 "folder is intact (try a lower --learning-rate or --dtype float32)")


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_replicas_agree(ppo_trainer, step):
    """Data-parallel processes must hold the same weights; checked (one float per process) before each save."""
    accelerator = ppo_trainer.accelerator
    if accelerator.num_processes == 1:
        return
    model = accelerator.unwrap_model(ppo_trainer.model)
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad]).sum()
    sums = accelerator.gather(checksum.reshape(1)).tolist()
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        fail(f"weights differ across processes at step {step} ({sums}); not saving")
    accelerator.print(f"step {step}: trainable weights identical on all {len(sums)} processes")


def fsync_tree(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def model_card(args, step, summary):
    """README.md of a checkpoint: how it was made, and the last training numbers."""
    summary = summary or {}
    reward = f"{summary['reward']:.4f}" if "reward" in summary else "n/a"
    kl = f"{summary['kl']:.4f}" if "kl" in summary else "n/a"
    base = args.model
    method = (f"LoRA adapters (r={args.lora_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout}) and a value "
              "head; the reference is the base model with adapters disabled") if args.use_peft else (
              f"full fine-tuning in {args.dtype} with a value head; the reference shares (stores once) the policy's "
              f"embeddings and first {args.num_shared_layers if args.num_shared_layers is not None else '20/28 of the'} blocks")
    return f"""---
base_model: {base}
library_name: transformers
pipeline_tag: text-generation
tags:
- detox
- trl
- ppo
- reinforcement-learning
- detoxification
---

# {os.path.basename(os.path.normpath(args.output_dir))}: {base} detoxified with PPO

Trained with detox (`detoxify_ppo.py`, TRL 0.11.4's PPOTrainer) to write less toxic continuations.

| | |
|---|---|
| base model | `{base}` |
| prompts | `{args.dataset}` (split {args.dataset_split}), rows with prompt.toxicity > {args.toxicity_threshold}; {args.test_fraction:.0%} held out (seed {args.seed}) |
| queries / responses | {args.min_context_tokens}-{args.max_context_tokens} context tokens / {args.min_new_tokens}-{args.max_new_tokens} sampled tokens (top_k 0, top_p 1.0) |
| reward | raw logit of `{args.reward_label}` from `{args.reward_model}`, on the response text only |
| method | {method} |
| PPO | learning rate {args.learning_rate}, batch {args.batch_size}, mini-batch {args.mini_batch_size}, gradient accumulation {args.gradient_accumulation_steps}, {args.ppo_epochs} PPO epochs, initial KL coefficient {args.init_kl_coef} ({'adaptive, target ' + str(args.target_kl) if args.adap_kl_ctrl else 'fixed'}) |
| steps | {step} |
| last step | mean reward {reward}, KL {kl} |

The reward classifier is also the default scorer of `evaluate_toxicity.py`: judge the model with an
independent classifier too (`--extra-toxicity-model`), and watch diversity and perplexity.

## Evaluation

{CARD_RESULTS_START}
Not evaluated yet: `python evaluate_toxicity.py --models {base} THIS_FOLDER --update-model-card`
{CARD_RESULTS_END}
"""


def save_checkpoint(ppo_trainer, tokenizer, args, path, step, summary=None):
    """Write everything a resume needs into PATH.tmp, flush it, then rename: a crash leaves the old one whole.

    PATH holds a plain causal LM in safetensors (AutoModelForCausalLM.from_pretrained(PATH) loads it), its
    tokenizer, the value head, the optimizer, the KL controller, the step and every process's RNG state.
    """
    accelerator = ppo_trainer.accelerator
    check_replicas_agree(ppo_trainer, step)
    tmp = f"{path}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pth"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        model = accelerator.unwrap_model(ppo_trainer.model)
        model.pretrained_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in model.v_head.state_dict().items()},
                  os.path.join(tmp, "value_head.safetensors"))
        torch.save(ppo_trainer.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "kl_coef": float(ppo_trainer.kl_ctl.value), "num_processes": accelerator.num_processes}, f)
        with open(os.path.join(tmp, "training_args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(args, step, summary))
        fsync_tree(tmp)
        old = f"{path}.old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_merged(ppo_trainer, tokenizer, args, step, summary):
    """final-merged/: LoRA adapters folded into the base weights, loadable by AutoModelForCausalLM alone."""
    path = os.path.join(args.output_dir, "final-merged")
    merged = ppo_trainer.accelerator.unwrap_model(ppo_trainer.model).pretrained_model.merge_and_unload()
    merged.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(model_card(args, step, summary))
    return path


def push_to_hub(folder, repo_id):
    """Upload model, tokenizer and card; training state (optimizer, RNG) stays local."""
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, exist_ok=True)
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload model detoxified with PPO",
                                  ignore_patterns=["optimizer.pt", "rng_state_*.pth", "trainer_state.json"])
    print(f"pushed {folder} to {repo_id}")


def prune_checkpoints(output_dir, keep):
    """Keep the newest `keep` checkpoint-STEP folders (final/ is never pruned)."""
    steps = sorted(int(m.group(1)) for name in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", name)))
    for step in steps[:-keep] if keep else []:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"), ignore_errors=True)


def find_checkpoint(args):
    """The folder --resume-from-checkpoint names ('auto': the newest checkpoint-STEP in --output-dir), checked whole."""
    path = args.resume_from_checkpoint
    if path == "auto":
        names = [n for n in os.listdir(args.output_dir) if re.fullmatch(r"checkpoint-\d+", n)] if os.path.isdir(args.output_dir) else []
        if not names:  # nothing to resume: a pre-empted job can rerun one command from the start
            if os.path.isdir(os.path.join(args.output_dir, "final")):
                fail(f"{args.output_dir} already holds a finished run (final/); pick another --output-dir")
            return None
        path = os.path.join(args.output_dir, max(names, key=lambda n: int(n.split("-")[1])))
    if not os.path.isdir(path):
        fail(f"--resume-from-checkpoint {path}: no such folder")
    required = CHECKPOINT_FILES if not args.use_peft else [
        "adapter_config.json" if n == "config.json" else "adapter_model.safetensors" if n == "model.safetensors" else n
        for n in CHECKPOINT_FILES]
    missing = [name for name in required if not os.path.isfile(os.path.join(path, name))]
    if missing:
        fail(f"checkpoint {path} is incomplete: missing {', '.join(missing)}; resume from an earlier checkpoint")
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        with open(os.path.join(path, "training_args.json")) as f:
            saved_args = json.load(f)
        from safetensors import safe_open

        for name in ("adapter_model.safetensors" if args.use_peft else "model.safetensors", "value_head.safetensors"):
            with safe_open(os.path.join(path, name), "pt"):
                pass  # safetensors checks that the header's tensors cover the file: a truncated one fails here
    except Exception as e:
        fail(f"checkpoint {path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             "resume from an earlier checkpoint")
    changed = [k for k in DATA_ORDER_ARGS if saved_args.get(k) != getattr(args, k)]
    if changed:
        fail(f"checkpoint {path} was trained with other {', '.join('--' + k.replace('_', '-') for k in changed)} "
             f"({', '.join(f'{k}={saved_args.get(k)!r}' for k in changed)}); resume with the same values")
    return path, state


def load_checkpoint(ppo_trainer, path, state):
    """Restore weights, value head, optimizer, KL coefficient and this process's RNG state."""
    from safetensors.torch import load_file

    accelerator = ppo_trainer.accelerator
    model = accelerator.unwrap_model(ppo_trainer.model)
    if os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        from peft import set_peft_model_state_dict

        adapters = load_file(os.path.join(path, "adapter_model.safetensors"), device=str(accelerator.device))
        set_peft_model_state_dict(model.pretrained_model, adapters)
        return restore_training_state(ppo_trainer, model, path, state)
    weights = load_file(os.path.join(path, "model.safetensors"), device=str(accelerator.device))
    current = model.pretrained_model.state_dict()
    loaded = {current[k].data_ptr() for k in weights if k in current}
    missing = [k for k in current if k not in weights and current[k].data_ptr() not in loaded]  # tied ones are loaded
    unexpected = [k for k in weights if k not in current]
    if missing or unexpected:
        fail(f"checkpoint {path} does not fit --model {model.config._name_or_path}: missing {missing[:3]}, "
             f"unexpected {unexpected[:3]}")
    model.pretrained_model.load_state_dict(weights, strict=False)
    return restore_training_state(ppo_trainer, model, path, state)


def restore_training_state(ppo_trainer, model, path, state):
    from safetensors.torch import load_file

    accelerator = ppo_trainer.accelerator
    model.v_head.load_state_dict(load_file(os.path.join(path, "value_head.safetensors"), device=str(accelerator.device)))
    ppo_trainer.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=accelerator.device,
                                                     weights_only=False))
    ppo_trainer.kl_ctl.value = state["kl_coef"]
    ppo_trainer.current_step = state["step"]  # trl logs to trackers at this step
    set_rng_state(torch.load(os.path.join(path, f"rng_state_{accelerator.process_index}.pth"), weights_only=False))
    return state["step"]


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the step in flight, saves and exits. A second signal kills."""

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, signal.SIG_DFL)

    def agreed(self, accelerator):
        """True on every process once any process was signalled (so all ranks stop at the same step)."""
        flag = torch.tensor([float(self.signal is not None)], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item())


def parse_args(argv=None):
    """Options from the command line, with defaults from --config FILE.yaml when given (flags win)."""
    parser = HfArgumentParser(Args)
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    if config_path:
        import yaml

        try:
            with open(config_path) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            fail(f"cannot read --config {config_path} ({type(e).__name__}); give a YAML file of option: value lines")
        values = {str(k).replace("-", "_"): v for k, v in values.items()} if isinstance(values, dict) else None
        known = {f.name for f in dataclasses.fields(Args)}
        if values is None or set(values) - known:
            fail(f"--config {config_path} has unknown options {sorted(set(values or {}) - known) or '(not a mapping)'}; "
                 "see --help")
        parser.set_defaults(**values)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    check_args(args)

    # Configs first: a wrong model name or label fails in seconds, before any weights or data load.
    policy_config = load_config(args.model, "model", args.trust_remote_code)
    reward_config = load_config(args.reward_model, "reward model")
    reward_index = label_index(reward_config, args.reward_label, f"reward model {args.reward_model}")
    num_shared_layers = resolve_shared_layers(args, policy_config)
    resume = find_checkpoint(args) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint == "auto" and resume is None:
        print(f"--resume-from-checkpoint auto: no checkpoint in {args.output_dir}, starting from step 0")
    check_disk(args, policy_config, num_shared_layers)

    from accelerate import PartialState
    from accelerate.utils import gather_object

    # Created before trl touches accelerate: without cpu=True, processes launched on a machine without
    # GPUs would each train alone instead of data-parallel over gloo.
    state = PartialState(cpu=not torch.cuda.is_available())
    if resume and resume[1]["num_processes"] != state.num_processes:  # each process's batches depend on the count
        fail(f"checkpoint {resume[0]} was trained with {resume[1]['num_processes']} process(es), this run has "
             f"{state.num_processes}; resume with the same number of processes")
    kept = load_prompts(args)
    train_rows, heldout_rows = split_prompts(kept, args, state.num_processes)

    # Heavy imports after the checks, so bad input fails fast.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, set_seed

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    queries = build_queries(train_rows, tokenizer, args)
    if state.is_main_process and len(heldout_rows):
        heldout_rows.to_json(os.path.join(args.output_dir, "heldout_prompts.jsonl"))

    dtype = DTYPES[args.dtype]
    if args.use_peft:
        model = load_peft_policy(args, dtype, state.device)
        ref_model = None  # trl uses the policy with its adapters disabled: no second copy at all
    else:
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base).to(device=state.device, dtype=dtype)
        # The reference is built from the base weights; a resumed policy gets its trained weights afterwards.
        ref_model = create_shared_reference(model, num_shared_layers)

    total_steps = args.steps or len(queries) // (args.batch_size * state.num_processes)
    ppo_trainer = build_ppo_trainer(args, model, ref_model, tokenizer, total_steps, num_shared_layers)
    accelerator = ppo_trainer.accelerator
    reward_tokenizer, reward_model = load_classifier(args.reward_model, accelerator.device, reward_dtype(args, accelerator.device))
    reward_fn = functools.partial(score_responses, reward_tokenizer, reward_model, reward_index,
                                  batch_size=args.reward_batch_size)
    start_step = load_checkpoint(ppo_trainer, *resume) if resume else 0
    if start_step >= total_steps:
        fail(f"checkpoint {resume[0]} is at step {start_step}, not below --steps {total_steps}; nothing to do")

    if state.is_main_process:
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state.print(f"policy {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {trainable:,} trainable; "
                + ("reference = the policy with adapters disabled; " if args.use_peft else
                   f"{num_shared_layers}/{num_blocks(policy_config)} blocks shared with the reference; ") +
                f"{len(queries)} training prompts, {len(heldout_rows)} held out; {total_steps} steps of "
                f"{args.batch_size} x {state.num_processes} process(es) = {args.batch_size * state.num_processes} "
                "episodes" + (f"; resuming from {resume[0]} at step {start_step}" if resume else ""))

    from tqdm.auto import tqdm
    progress = tqdm(total=total_steps, initial=start_step, desc="PPO", disable=not state.is_main_process,
                    dynamic_ncols=True)
    # Every step's scalars and every episode (query, response, reward) are kept as JSON lines; a resumed
    # run drops lines past its checkpoint, so the files match an uninterrupted run.
    log_files = {}
    if state.is_main_process:
        for name in ("stats", "samples"):
            path = os.path.join(args.output_dir, f"{name}.jsonl")
            lines = open(path).readlines() if resume and os.path.exists(path) else []
            log_files[name] = open(path, "w")
            log_files[name].writelines(line for line in lines if json.loads(line)["step"] <= start_step)
    stop = StopRequest()
    summary = None
    try:  # the progress bar and log files close before any error line is printed
        for step in range(start_step + 1, total_steps + 1):
            rows = queries[batch_indices(step - 1, len(queries), args.batch_size, state.num_processes,
                                         state.process_index, args.seed)]
            batch = {"input_ids": list(rows["input_ids"]), "query": rows["query"]}
            lengths = response_lengths(step, len(batch["query"]), args, state.process_index)
            stats, responses, rewards = ppo_step(ppo_trainer, tokenizer, reward_fn, batch, lengths, step)
            ppo_trainer.log_stats(stats, batch, rewards)
            episodes = [{"step": step, "process": state.process_index, "query": q, "response": r, "reward": w}
                        for q, r, w in zip(batch["query"], batch["response"], torch.stack(rewards).tolist())]
            if state.num_processes > 1:
                episodes = gather_object(episodes)  # every process's episodes reach samples.jsonl
            reward_mean = float(np.mean([e["reward"] for e in episodes]))
            progress.update(1)
            progress.set_postfix(reward=f"{reward_mean:.3f}", kl=f"{float(stats['objective/kl']):.3f}")
            summary = {"reward": reward_mean, "kl": float(stats["objective/kl"])}
            if log_files:
                scalars = {k: float(v) for k, v in stats.items() if np.ndim(v) == 0}
                log_files["stats"].write(json.dumps({"step": step, "env/reward_mean": reward_mean, **scalars}) + "\n")
                log_files["samples"].writelines(json.dumps(e) + "\n" for e in episodes)
                for f in log_files.values():
                    f.flush()
            if stop.agreed(accelerator) and step < total_steps:
                path = os.path.join(args.output_dir, f"checkpoint-{step}")
                save_checkpoint(ppo_trainer, tokenizer, args, path, step, summary)
                name = signal.Signals(stop.signal).name if stop.signal else "a signal on another process"
                command = " ".join(["python", *sys.argv]) if argv is None else "the same command"
                raise SystemExit(f"interrupted by {name} at step {step}/{total_steps}; saved {path}; resume with: "
                                 f"{command} --resume-from-checkpoint {path}")
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save_checkpoint(ppo_trainer, tokenizer, args, os.path.join(args.output_dir, f"checkpoint-{step}"), step,
                                summary)
                if state.is_main_process and args.save_total_limit:
                    prune_checkpoints(args.output_dir, args.save_total_limit)
    finally:
        stop.restore()
        progress.close()
        for f in log_files.values():
            f.close()
    final = os.path.join(args.output_dir, "final")
    save_checkpoint(ppo_trainer, tokenizer, args, final, total_steps, summary)
    accelerator.end_training()
    state.print(f"saved {final} after {total_steps} steps")
    if state.is_main_process and args.merge_adapters:
        final = save_merged(ppo_trainer, tokenizer, args, total_steps, summary)
        print(f"saved {final}: the adapters merged into a plain {args.model}")
    if state.is_main_process and args.push_to_hub:
        push_to_hub(final, args.push_to_hub)


if __name__ == "__main__":
    sys.exit(main())
