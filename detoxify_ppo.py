"""Detoxify a causal language model with PPO (TRL's classic PPOTrainer, trl==0.11.4).

Reproduces the TRL study "Detoxifying a Language Model using PPO": toxic prompts from allenai/real-toxicity-prompts,
reward = raw "nothate" logit of a RoBERTa hate-speech classifier on the generated text only, a pure bfloat16 policy
with trl's float32 value head, and a reference model that shares (same storage) the policy's first blocks, so
GPT-J-6B fits one 40 GB GPU. The file runs top to bottom: arguments, checks, data, models, then the PPO loop
(rollout -> reward -> update -> log/save). What changes trl's behaviour is in ppo_speedups.py; checkpoints and faults
are in checkpoints.py.

    python detoxify_ppo.py --model EleutherAI/gpt-neo-125M
    accelerate launch detoxify_ppo.py --model EleutherAI/gpt-j-6B
"""

import copy
import dataclasses
import functools
import importlib.util
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

import checkpoints
import scale_out
from detox_common import (
    DTYPES,
    OutputLock,
    check_causal_lm,
    check_sequence_classifier,
    classifier_logits,
    cli_parser,
    context_length,
    fail,
    label_index,
    load_classifier,
    load_config,
    load_rows,
    quiet_libraries,
    reward_terms,
    save_figure,
    write_atomic,
)

# trl is pinned on purpose (see README); its deprecation notices, and transformers' notice about the
# past_key_values argument trl's value-head model passes, say nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*(PPOTrainer|PPOConfig)` is deprecated")
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated")
# Batches are drawn by batch_indices() (seeded, resumable, sharded per process), not by trl's dataloader.
warnings.filterwarnings("ignore", message=r"No dataset is provided")

# The study shared 20 of GPT-J-6B's 28 blocks; the default keeps that fraction for every model size.
DEFAULT_SHARED_FRACTION = 20 / 28
BLOCK_PATHS = ["transformer.h", "model.decoder.layers", "gpt_neox.layers", "model.layers"]  # where blocks live


def option(default, help, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class Args:
    # data
    dataset: str = option("allenai/real-toxicity-prompts", "prompts: hub id or local .jsonl/.json/.parquet/.csv "
                          "file or folder, in the real-toxicity-prompts schema")
    dataset_split: str = option("train", "split of a hub dataset")
    toxicity_threshold: float = option(0.3, "keep rows whose prompt.toxicity is above this")
    test_fraction: float = option(0.2, "seeded share of kept rows held out from training (heldout_prompts.jsonl)")
    min_context_tokens: int = option(10, "shortest query, in tokens (the study's text; its script drew 30-39)")
    max_context_tokens: int = option(15, "longest query, in tokens")
    min_new_tokens: int = option(20, "shortest response, in tokens")
    max_new_tokens: int = option(30, "longest response, in tokens (inclusive; the study's script drew 20-29)")
    # reward
    reward_model: list[str] = field(default_factory=lambda: ["facebook/roberta-hate-speech-dynabench-r4-target"],
                                    metadata={"help": "sequence classifier(s) giving the reward: hub ids or local "
                                              "folders; with several, the reward is the weighted sum of their logits"})
    reward_label: list[str] = field(default_factory=lambda: ["nothate"], metadata={
        "help": "reward = raw logit of this id2label class on the response text: one label, or one per --reward-model"})
    reward_weight: list[float] = field(default_factory=lambda: [1.0], metadata={
        "help": "weight of each --reward-model's logit in the reward: one weight for all, or one per model"})
    reward_batch_size: int = option(64, "texts per classifier forward pass")
    reward_dtype: str = option("auto", "classifier dtype: auto (float16 on GPU, bfloat16 on CPU), bfloat16, float16 "
                               "or float32")
    # policy and reference
    model: str = option("EleutherAI/gpt-neo-125M", "policy to detoxify: hub id or local folder")
    dtype: str = option("bfloat16", "policy dtype: bfloat16 (pure bf16, as the study), float16 or float32; the "
                        "value head stays float32, as trl keeps it")
    num_shared_layers: Optional[int] = option(None, "first blocks frozen and stored once for policy and reference "
                                              "(default: 20/28 of the blocks, as the study; 0: a full copy)")
    trust_remote_code: bool = option(False, "allow model code from the hub")
    # PPO
    learning_rate: float = option(2.94e-5, "Adam learning rate (the study's script: (1.47e-5) * 2)")
    batch_size: int = option(16, "episodes per PPO step and process (the study's)")
    mini_batch_size: int = option(4, "episodes per PPO optimisation mini-batch (the study's)")
    gradient_accumulation_steps: int = option(1, "mini-batches per optimiser step")
    ppo_epochs: int = option(4, "optimisation passes over each batch (TRL's default; the study's script used 100)")
    init_kl_coef: float = option(0.2, "initial KL penalty coefficient")
    adap_kl_ctrl: bool = option(True, "adapt the KL coefficient towards --target-kl")
    target_kl: float = option(6.0, "KL target of the adaptive controller")
    ratio_threshold: float = option(10.0, "trl skips (zeroes the losses of) a mini-batch whose average probability "
                                    "ratio is above this (trl's default); counted as ppo/skipped_batches")
    seed: int = option(0, "seed for data split, context lengths, sampling and init")
    steps: Optional[int] = option(None, "PPO steps (default: one pass over the training rows)")
    # evaluation during training (evaluate_heldout)
    eval_every: int = option(0, "evaluate the policy on held-out prompts at step 0, every this many steps and at the "
                             "end, logged as eval/... (0: no evaluation during training)")
    eval_prompts: int = option(64, "held-out prompts each evaluation generates for: a fixed, seeded sample, at most "
                               "the number held out")
    eval_samples_per_prompt: int = option(1, "responses sampled per evaluation prompt")
    # speed-ups (ppo_speedups.py; BENCHMARKS.md measures each)
    frozen_prefix_cache: bool = option(True, "run the shared frozen blocks once per PPO step, not in each of trl's "
                                       "2 + ppo_epochs passes (same update, bit for bit)")
    response_only_logits: bool = option(True, "after the policy's first pass, compute LM-head logits only at the "
                                        "response positions trl reads (same update to float rounding)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less activation "
                                          "memory for long sequences, slower steps")
    # LoRA
    use_peft: bool = option(False, "train LoRA adapters (plus the value head); the reference is the same model with "
                            "adapters disabled")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA scaling alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target_modules: Optional[list[str]] = option(None, "modules to adapt (default: peft's choice for the "
                                                      "architecture, q_proj v_proj for GPT-Neo/GPT-J)")
    load_in_8bit: bool = option(False, "load the base model in 8 bit through bitsandbytes (GPU, with --use-peft)")
    load_in_4bit: bool = option(False, "load the base model in 4 bit through bitsandbytes (GPU, with --use-peft)")
    merge_adapters: bool = option(False, "also write final-merged/: the adapters merged into a plain model")
    # run and hub
    output_dir: str = option("out", "checkpoints, arguments and stats go here")
    log_with: str = option("none", "tracker: tensorboard, wandb or none (stats.jsonl is always written)")
    save_every: int = option(100, "write checkpoint-STEP every this many steps (0: only the final model)")
    save_total_limit: Optional[int] = option(None, "keep only the newest K checkpoint-STEP folders")
    resume_from_checkpoint: Optional[str] = option(None, "a checkpoint-STEP folder to resume from, or 'auto' for the "
                                                   "newest in --output-dir (one of another folder: only into an "
                                                   "empty --output-dir); a new --learning-rate is honoured")
    overwrite_output_dir: bool = option(False, "start over in an output dir that holds a run: its checkpoints, final/ "
                                        "and logs are removed first")
    push_to_hub: Optional[str] = option(None, "upload the final model, tokenizer and card to this hub repo "
                                        "(owner/name)")
    config: Optional[str] = option(None, "YAML file giving options; command-line flags win")
    verbose: bool = option(False, "also show the libraries' progress bars and notices (loading, saving, datasets)")


# What --no-FLAG does, for the flags that are on by default.
NO_FLAG_HELP = {
    "adap_kl_ctrl": "keep the KL coefficient fixed at --init-kl-coef",
    "frozen_prefix_cache": "run the shared blocks in every one of trl's passes, as trl does",
    "response_only_logits": "compute LM-head logits at every position in every pass, as trl does",
}
# Arguments that decide which batches come in which order: a resumed run must keep them.
DATA_ORDER_ARGS = ["model", "dataset", "dataset_split", "toxicity_threshold", "test_fraction", "min_context_tokens",
                   "max_context_tokens", "min_new_tokens", "max_new_tokens", "batch_size", "seed", "num_shared_layers"]


def build_parser(error_context=""):
    return cli_parser(Args, __doc__, NO_FLAG_HELP, error_context)


def parse_args(argv=None):
    """Options from the command line, with defaults from --config FILE.yaml when given (flags win)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    config_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), config_path)
    config_argv = config_arguments(config_path, parser) if config_path else []
    if config_argv:  # parsed alone first, so a bad value is reported as the file's
        build_parser(f"--config {config_path}: ").parse_args_into_dataclasses(args=config_argv)
    (args,) = parser.parse_args_into_dataclasses(args=config_argv + argv)  # the later of two values wins
    return args


def config_arguments(path, parser):
    """A YAML file of `option: value` lines as the command-line arguments (of `parser`) that say the same, so each
    value is checked and converted exactly as a flag is; `option: null` keeps the default."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot read --config {path} ({type(e).__name__}); give a YAML file of option: value lines")
    if not isinstance(values, dict):
        fail(f"--config {path} is not a mapping of option: value lines; see --help")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(Args)} - {"config"}
    if set(values) - known:
        fail(f"--config {path} has unknown options {sorted(set(values) - known)}; see --help")

    several = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if (isinstance(value, list) and key not in several) or not items or any(
                isinstance(v, (dict, list)) or v is None for v in items):
            fail(f"--config {path}: {key}: {value!r} is not a value --{key.replace('_', '-')} takes; see --help")
        argv += [f"--{key}", *(("true" if v else "false") if isinstance(v, bool) else str(v) for v in items)]
    return argv


# ---------------------------------------------------------------------------------------------- checks
def reward_name(classifier, label):
    """How one reward term is logged: env/reward/<folder or repo name>/<label>."""
    return f"{os.path.basename(classifier.rstrip('/')) or classifier}/{label}"


def check_args(args):
    """Refuse impossible settings before anything is loaded."""
    terms = reward_terms(args.reward_model, args.reward_label, args.reward_weight)
    if len({reward_name(model, label) for model, label, _ in terms}) < len(terms):
        fail("two --reward-model terms have the same folder name and label; each is logged under its own name")
    if args.min_context_tokens < 1 or args.min_context_tokens > args.max_context_tokens:
        fail(f"--min-context-tokens ({args.min_context_tokens}) must be >= 1 and <= --max-context-tokens "
             f"({args.max_context_tokens})")
    if args.min_new_tokens < 1 or args.min_new_tokens > args.max_new_tokens:
        fail(f"--min-new-tokens ({args.min_new_tokens}) must be >= 1 and <= --max-new-tokens ({args.max_new_tokens})")
    backward = args.mini_batch_size * args.gradient_accumulation_steps
    if min(args.batch_size, args.mini_batch_size, args.gradient_accumulation_steps) < 1 or args.batch_size % backward:
        fail(f"--batch-size ({args.batch_size}) must be a multiple of --mini-batch-size x "
             f"--gradient-accumulation-steps ({backward})")
    if not 0 <= args.test_fraction < 1:
        fail(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    if args.dtype not in DTYPES:
        fail(f"--dtype must be bfloat16, float16 or float32, got {args.dtype}")
    if args.reward_dtype != "auto" and args.reward_dtype not in DTYPES:
        fail(f"--reward-dtype must be auto, {', '.join(DTYPES)}, got {args.reward_dtype}")
    if args.log_with not in ("none", "tensorboard", "wandb"):
        fail(f"--log-with must be tensorboard, wandb or none, got {args.log_with}")
    if args.log_with != "none" and importlib.util.find_spec(args.log_with) is None:  # trl finds out only at start-up
        fail(f"--log-with {args.log_with} needs the {args.log_with} package: pip install {args.log_with}, or drop "
             "--log-with (stats.jsonl is always written)")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        fail(f"--learning-rate must be a finite number above 0, got {args.learning_rate}")
    if not 0 <= args.seed < 2**32:  # numpy's seeds
        fail(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.reward_batch_size < 1:
        fail(f"--reward-batch-size must be >= 1, got {args.reward_batch_size}")
    if not 0 <= args.lora_dropout < 1:
        fail(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.init_kl_coef < 0 or not math.isfinite(args.init_kl_coef):
        fail(f"--init-kl-coef must be a finite number >= 0, got {args.init_kl_coef}")
    if args.adap_kl_ctrl and not (args.target_kl > 0 and math.isfinite(args.target_kl)):  # trl divides by it
        fail(f"--target-kl must be a finite number above 0 with the adaptive KL controller, got {args.target_kl} "
             "(or pass --no-adap-kl-ctrl for a fixed coefficient)")
    if args.num_shared_layers is not None and args.num_shared_layers < 0:
        fail(f"--num-shared-layers must be >= 0, got {args.num_shared_layers}")
    if (args.steps is not None and args.steps < 1) or args.save_every < 0 or args.ppo_epochs < 1:
        fail("--steps and --ppo-epochs must be >= 1 and --save-every >= 0")
    if args.eval_every < 0:
        fail(f"--eval-every must be >= 0 (0: no evaluation during training), got {args.eval_every}")
    if min(args.eval_prompts, args.eval_samples_per_prompt) < 1:
        fail("--eval-prompts and --eval-samples-per-prompt must be >= 1")
    if args.eval_every and args.test_fraction == 0:
        fail("--eval-every evaluates on held-out prompts, and --test-fraction 0 holds none out: give --test-fraction "
             "above 0 (default 0.2), or drop --eval-every")
    if (args.load_in_8bit or args.load_in_4bit) and not args.use_peft:
        fail("--load-in-8bit/--load-in-4bit train only adapters: add --use-peft")
    if args.load_in_8bit and args.load_in_4bit:
        fail("choose one of --load-in-8bit and --load-in-4bit")
    if (args.load_in_8bit or args.load_in_4bit) and not torch.cuda.is_available():
        fail("--load-in-8bit/--load-in-4bit need a CUDA GPU (bitsandbytes); on CPU use --use-peft alone")
    scale_out.refuse_untested_under_deepspeed(args.use_peft, args.gradient_checkpointing)
    if args.merge_adapters and not args.use_peft:
        fail("--merge-adapters needs --use-peft (without it the saved model is already plain)")
    if args.use_peft and min(args.lora_r, args.lora_alpha) < 1:
        fail("--lora-r and --lora-alpha must be >= 1")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        fail(f"--save-total-limit must be >= 1, got {args.save_total_limit}")
    resume_inside = args.resume_from_checkpoint == "auto" or (
        args.resume_from_checkpoint and checkpoints.in_folder(args.resume_from_checkpoint, args.output_dir))
    if args.overwrite_output_dir and resume_inside:
        fail("--overwrite-output-dir removes the earlier run that --resume-from-checkpoint "
             f"{args.resume_from_checkpoint} would resume; drop one of them")
    OutputLock.refuse_if_held(args.output_dir)
    if os.path.isdir(args.output_dir) and not args.overwrite_output_dir and not args.resume_from_checkpoint and any(
            name.startswith("checkpoint-") or name == "final" for name in os.listdir(args.output_dir)):
        fail(f"--output-dir {args.output_dir} already holds checkpoints; pick another folder or pass "
             "--overwrite-output-dir")
    # whether the folder can be written is found by taking its lock (OutputLock in main): a real write


def num_blocks(config):
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    fail(f"cannot tell how many blocks {config.model_type} has; pass --num-shared-layers 0")


def resolve_shared_layers(requested, config):
    """--num-shared-layers, or by default the study's 20/28 of the model's blocks."""
    blocks = num_blocks(config)
    n = int(blocks * DEFAULT_SHARED_FRACTION) if requested is None else requested
    if n >= blocks:
        fail(f"--num-shared-layers ({n}) must be below the model's block count ({blocks}): the policy needs "
             "trainable blocks")
    return n


def estimate_checkpoint_bytes(config, dtype, num_shared_layers, trust_remote_code=False):
    """Weights plus Adam state (two moments of the trainable part), counted on a weightless meta model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    shared_names = set(shared_parameter_names(model, num_shared_layers))
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in shared_names)
    return (total + 2 * trainable) * torch.tensor([], dtype=dtype).element_size()


@dataclass(frozen=True)
class Preflight:
    """What the checks learned, before any weights or rows load."""
    policy_config: object
    reward_indices: tuple  # of each --reward-model's --reward-label, in order
    num_shared_layers: int


def preflight(args):
    """Configs first: a wrong model name or label fails in seconds. Then free disk for a checkpoint."""
    policy_config = load_config(args.model, "model", args.trust_remote_code)
    if not args.trust_remote_code:  # a model of its own code names its own architecture
        check_causal_lm(policy_config, args.model)
    positions = context_length(policy_config)
    if positions is not None and args.max_context_tokens + args.max_new_tokens > positions:
        fail(f"model {args.model} takes {positions} positions, fewer than --max-context-tokens "
             f"{args.max_context_tokens} + --max-new-tokens {args.max_new_tokens}; lower them")
    reward_indices = []
    for model, label, _ in reward_terms(args.reward_model, args.reward_label, args.reward_weight):
        reward_config = load_config(model, "reward model")
        check_sequence_classifier(reward_config, model, "reward model")
        reward_indices.append(label_index(reward_config, label, f"reward model {model}"))
    num_shared_layers = resolve_shared_layers(args.num_shared_layers, policy_config)
    need = estimate_checkpoint_bytes(policy_config, DTYPES[args.dtype], num_shared_layers, args.trust_remote_code)
    existing = os.path.abspath(args.output_dir)
    while not os.path.exists(existing):  # the folder itself is made once every check has passed
        existing = os.path.dirname(existing)
    checkpoints.check_disk(args.output_dir, existing, need)
    return Preflight(policy_config, tuple(reward_indices), num_shared_layers)


def resume_point(args, policy_config, is_main_process, wait_for_everyone):
    """The checked checkpoint to resume from (None: start at step 0), once the main process has tidied what a cut-short
    save left. With --overwrite-output-dir, the earlier run is then removed (only after every check has passed)."""
    if is_main_process:
        for line in checkpoints.recover_folders(args.output_dir):
            print(f"{args.output_dir}: {line} (left by a save that was cut short)")
    wait_for_everyone()
    resume = None
    if args.resume_from_checkpoint:
        data_order = {k: getattr(args, k) for k in DATA_ORDER_ARGS}
        resume = checkpoints.find_checkpoint(args.resume_from_checkpoint, args.output_dir, args.use_peft, data_order,
                                             getattr(policy_config, "hidden_size", None), args.overwrite_output_dir)
        if resume is None:
            print(f"--resume-from-checkpoint auto: no checkpoint in {args.output_dir}, starting from step 0")
        elif args.steps is not None and resume.step >= args.steps:
            fail(f"checkpoint {resume.path} is at step {resume.step}, not below --steps {args.steps}; nothing to do (a "
                 "larger --steps trains it further)")
    if is_main_process and args.overwrite_output_dir and (removed := checkpoints.remove_run(args.output_dir)):
        print(f"--overwrite-output-dir: removed the earlier run's {', '.join(removed)} from {args.output_dir}")
    wait_for_everyone()
    return resume


# ---------------------------------------------------------------------------------------------- data
def load_prompts(dataset, split, toxicity_threshold):
    """Rows of the real-toxicity-prompts schema whose prompt toxicity is above the threshold."""
    rows = load_rows(dataset, split)
    for column in ("prompt", "continuation"):
        if column not in rows.column_names:
            fail(f"dataset {dataset} has no '{column}' column (columns: {rows.column_names}); expected the "
                 "allenai/real-toxicity-prompts schema")
    prompt_keys = rows.features["prompt"].keys() if isinstance(rows.features["prompt"], dict) else ()
    for key in ("text", "toxicity"):
        if key not in prompt_keys:
            fail(f"dataset {dataset} has no 'prompt.{key}' field; expected the allenai/real-toxicity-prompts schema")
    kept = []  # the rows to keep, each checked: a bad one is named by its number in the dataset (1: the first)
    for i, prompt in enumerate(rows["prompt"]):
        toxicity = prompt["toxicity"]
        if toxicity is not None and (isinstance(toxicity, (str, bool)) or not math.isfinite(toxicity)):
            fail(f"dataset {dataset} row {i + 1}: prompt.toxicity {toxicity!r} is not a number (or null)")
        if toxicity is not None and toxicity > toxicity_threshold:
            if not isinstance(prompt["text"], str) or not prompt["text"].strip():
                fail(f"dataset {dataset} row {i + 1}: prompt.text {prompt['text']!r} is not a text to continue")
            kept.append(i)
    return rows.select(kept)


def split_prompts(kept, test_fraction, seed, rows_needed):
    """Seeded train/held-out split; at least `rows_needed` training rows (one batch on every process)."""
    if test_fraction > 0 and len(kept) >= 2:
        parts = kept.train_test_split(test_size=test_fraction, seed=seed)
        train, heldout = parts["train"], parts["test"]
    else:
        train, heldout = kept, kept.select([])
    if len(train) < rows_needed:
        fail(f"only {len(train)} training rows are left (of {len(kept)} kept, after holding out {test_fraction:.0%}); "
             f"one batch needs {rows_needed}: lower --toxicity-threshold or --batch-size, or use more data")
    return train, heldout


def build_queries(rows, tokenizer, min_tokens, max_tokens, seed):
    """Query = prompt running on into the continuation, cut to a seeded length in [min, max] tokens."""
    lengths = np.random.default_rng(seed).integers(min_tokens, max_tokens + 1, size=len(rows))

    def tokenize(batch, indices):
        texts = [p["text"] + (c["text"] or "") for p, c in zip(batch["prompt"], batch["continuation"])]
        ids = [x[: lengths[i]] for x, i in zip(tokenizer(texts)["input_ids"], indices)]
        return {"input_ids": ids, "query": tokenizer.batch_decode(ids)}

    queries = rows.map(tokenize, batched=True, with_indices=True, remove_columns=rows.column_names)
    queries.set_format("torch", columns=["input_ids"], output_all_columns=True)
    return queries


def choose_eval_queries(heldout_rows, num_prompts, tokenizer, min_tokens, max_tokens, seed):
    """The fixed sample every evaluation generates for: `num_prompts` held-out rows (at most all), drawn once from
    `seed`, as queries built like the training ones."""
    count = min(num_prompts, len(heldout_rows))
    chosen = np.random.default_rng([seed, len(heldout_rows)]).choice(len(heldout_rows), size=count, replace=False)
    return build_queries(heldout_rows.select(sorted(chosen.tolist())), tokenizer, min_tokens, max_tokens, seed)


def batch_indices(step, num_rows, batch_size, num_processes, process_index, seed):
    """Rows of `step` for this process: a seeded permutation per pass, cut into per-process batches.

    The order depends only on (seed, step), so a resumed run sees exactly the batches an uninterrupted one would."""
    steps_per_pass = num_rows // (batch_size * num_processes)
    epoch, position = divmod(step, steps_per_pass)
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    start = (position * num_processes + process_index) * batch_size
    return order[start:start + batch_size].tolist()


def response_lengths(step, size, min_new_tokens, max_new_tokens, seed, process_index):
    """Seeded per (step, process), min..max inclusive: resuming needs no generator state."""
    rng = np.random.default_rng([seed, process_index, step])
    return rng.integers(min_new_tokens, max_new_tokens + 1, size=size)


# ---------------------------------------------------------------------------------------------- models
def shared_parameter_names(model, num_shared_layers):
    """Names of the parameters before block `num_shared_layers` (embeddings and the first blocks), in model order."""
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
    passing them in deepcopy's memo makes the copy reuse the very same Parameter objects instead."""
    shared = [model.get_parameter(name) for name in shared_parameter_names(model, num_shared_layers)]
    for param in shared:
        param.requires_grad_(False)
    ref_model = copy.deepcopy(model, memo={id(p): p for p in shared})
    for param in ref_model.parameters():
        param.requires_grad_(False)
    return ref_model.eval()


def load_base_model(name, dtype, device, trust_remote_code=False, load_in_8bit=False, load_in_4bit=False):
    """The causal LM to detoxify, on `device` in `dtype` (or quantized through bitsandbytes, for LoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if load_in_8bit or load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                          bnb_4bit_compute_dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, quantization_config=quantization,
                                                    trust_remote_code=trust_remote_code, device_map={"": device})
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code).to(device)


def build_models(base, num_shared_layers, lora_config=None):
    """(policy with value head, reference) around `base`. The value head is trl's, in float32.

    Full fine-tuning: the reference shares the policy's first `num_shared_layers` blocks (create_shared_reference).
    LoRA (lora_config, a peft LoraConfig): only the adapters and value head train, and the reference is None: trl
    runs the policy with its adapters disabled, so there is no second copy at all."""
    from ppo_speedups import ValueHeadModel  # trl and its model code: imported once the arguments have passed

    policy = ValueHeadModel.from_pretrained(base, peft_config=lora_config)
    policy.v_head.to(next(base.parameters()).device)
    if lora_config is not None:
        return policy, None
    return policy, create_shared_reference(policy, num_shared_layers)


def make_ppo_config(args, total_steps, accelerator_kwargs=None):
    from trl import PPOConfig

    return PPOConfig(accelerator_kwargs=accelerator_kwargs or {},
        model_name=args.model, query_dataset=args.dataset, reward_model=",".join(args.reward_model), seed=args.seed,
        log_with=None if args.log_with == "none" else args.log_with, learning_rate=args.learning_rate,
        batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
        gradient_accumulation_steps=args.gradient_accumulation_steps, init_kl_coef=args.init_kl_coef,
        adap_kl_ctrl=args.adap_kl_ctrl, target=args.target_kl, ratio_threshold=args.ratio_threshold,
        steps=total_steps * args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing, tracker_project_name="detox",
        project_kwargs={"logging_dir": os.path.join(args.output_dir, "logs")},
    )


def build_ppo_trainer(ppo_config, model, ref_model, tokenizer, num_shared_layers, frozen_prefix_cache=True,
                      response_only_logits=True):
    """trl's PPOTrainer with ppo_speedups' speed-ups: fused Adam, the contiguous LM-head input, and (by choice) the
    frozen-prefix cache and response-only logits."""
    chosen = {"prefix": frozen_prefix_cache, "logits": response_only_logits}
    from ppo_speedups import SPEEDUPS, SpeedupPPOTrainer

    speedups = [name for name in SPEEDUPS if chosen.get(name, True)]
    return SpeedupPPOTrainer(ppo_config, model, ref_model, tokenizer, num_shared_layers, speedups)


# ---------------------------------------------------------------------------------------------- rollout, reward, update
def sample_responses(ppo_trainer, tokenizer, query_tensors, lengths):
    """One batched generate; each response is then cut to its own drawn length, which is the same distribution as
    sampling that many tokens (trl also cuts each response after its first eos)."""
    responses = ppo_trainer.generate(query_tensors, batch_size=len(query_tensors), return_prompt=False,
                                     max_new_tokens=int(max(lengths)), do_sample=True, top_k=0, top_p=1.0,
                                     pad_token_id=tokenizer.eos_token_id)
    return [r[:n] for r, n in zip(responses, lengths)]


def reward_dtype(name, device):
    """Half precision by default: float16 on GPU (as the study's script), bfloat16 on CPU."""
    if name != "auto":
        return DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def score_responses(classifiers, texts, batch_size=64):
    """Rewards (1-d float32 tensor), one per text, scored on the response text alone: the sum over classifiers
    [(name, tokenizer, model, class index, weight)] of weight x the raw logit of that class; and each term's
    unweighted logits by name, for env/reward/<name>."""
    terms = {name: classifier_logits(tokenizer, model, texts, batch_size)[:, index]
             for name, tokenizer, model, index, _ in classifiers}
    if len(classifiers) == 1 and classifiers[0][4] == 1.0:  # the study's reward, bit for bit (in the model's dtype)
        return terms[classifiers[0][0]], terms
    total = sum(weight * terms[name].float() for name, _, _, _, weight in classifiers)
    return total, terms


def check_finite(stats, step):
    """Stop on a non-finite loss, KL or log-probability; nothing after the last good checkpoint is saved."""
    for key in ("ppo/loss/total", "ppo/loss/policy", "ppo/loss/value", "objective/kl", "objective/logprobs",
                "objective/ref_logprobs"):
        if key in stats and not np.isfinite(np.asarray(stats[key], dtype=np.float64)).all():
            fail(f"non-finite {key} at step {step}; stopped without saving, the last checkpoint in the output "
                 "folder is intact (try a lower --learning-rate or --dtype float32)")


def ppo_step(ppo_trainer, tokenizer, reward_fn, batch, lengths, step):
    """Rollout, reward and PPO update of one batch; stats include seconds per phase. Stops on non-finite values."""
    t0 = time.perf_counter()
    responses = sample_responses(ppo_trainer, tokenizer, batch["input_ids"], lengths)
    batch["response"] = tokenizer.batch_decode(responses, skip_special_tokens=True)
    t1 = time.perf_counter()
    scores, terms = reward_fn(batch["response"])
    if not torch.isfinite(scores).all():  # one host sync for the whole batch
        fail(f"non-finite reward at step {step}; stopped without saving, the last checkpoint in the output folder "
             "is intact (check --reward-model)")
    rewards = list(scores)
    t2 = time.perf_counter()
    stats = ppo_trainer.step(batch["input_ids"], responses, rewards)
    t3 = time.perf_counter()
    check_finite(stats, step)
    stats.update({"time/generate": t1 - t0, "time/reward": t2 - t1, "time/optimize": t3 - t2})
    for name, logits in terms.items():  # each classifier's mean logit over every process's episodes
        stats[f"env/reward/{name}"] = ppo_trainer.accelerator.gather(logits.float().mean()[None]).mean().item()
    return stats, responses, rewards


@dataclass
class PPOHealth:
    """What trl 0.11.4 lets pass with a warning or not at all: the mini-batches it skipped (average probability
    ratio above ratio_threshold: losses zeroed, the optimiser still steps) and the steps whose mean KL to the
    reference is negative (a known failure of this trainer: trl issues 925, 1005, 1857). Running totals from
    `previous`, the stats.jsonl lines a resumed run keeps."""

    warn_share: float = 0.1  # a run ends with a warning when more than this share of batches or steps is affected
    negative_kl: float = -0.1  # nats: a batch's KL estimate scatters around 0 early in a run; that is not counted
    skipped: int = 0
    minibatches: int = 0
    negative_kl_steps: int = 0
    steps: int = 0

    @classmethod
    def from_stats(cls, previous):
        health = cls()
        for stats in previous:
            if not stats.get("eval"):  # the line of the evaluation before step 1 is no PPO step
                health.update(stats)
        return health

    def update(self, stats):
        """Add one step's stats; returns the running totals to log with them."""
        self.skipped += int(stats.get("ppo/skipped_batches", 0))
        self.minibatches += int(stats.get("ppo/minibatches", 0))
        self.negative_kl_steps += float(stats["objective/kl"]) < self.negative_kl
        self.steps += 1
        return {"ppo/skipped_batches_total": self.skipped, "objective/negative_kl_steps": self.negative_kl_steps}

    def report(self, ratio_threshold):
        """The end-of-run summary line, then a warning for each problem that passed warn_share."""
        lines = [f"PPO health: trl skipped {self.skipped} of {self.minibatches} mini-batches (average probability "
                 f"ratio above --ratio-threshold {ratio_threshold:g}); the mean KL was below {self.negative_kl:g} at "
                 f"{self.negative_kl_steps} of {self.steps} steps"]
        if self.minibatches and self.skipped > self.warn_share * self.minibatches:
            lines.append(f"warning: trl skipped {self.skipped / self.minibatches:.0%} of the mini-batches, whose "
                         "updates were lost; the policy moves too far per step: lower --learning-rate or --ppo-epochs")
        if self.steps and self.negative_kl_steps > self.warn_share * self.steps:
            share = self.negative_kl_steps / self.steps
            lines.append(f"warning: the mean KL to the reference was negative at {share:.0%} of the steps; a true KL "
                         "cannot be: the rollout's sampling and trl's forward pass disagree, or the policy drifts "
                         "too fast; lower --learning-rate")
        return lines


# ---------------------------------------------------------------------------------------------- held-out evaluation
TOXIC_THRESHOLD = 0.5  # a sample counts as toxic at this score (evaluate_toxicity.py's default --threshold)


def toxic_probability(reward_tokenizer, reward_model, reward_index, texts, batch_size=64):
    """Toxicity of each text (1-d tensor) under the reward classifier: the softmax probability of its classes other
    than the rewarded one; for a two-class classifier that is the toxic class ("hate" for the default one), the
    score evaluate_toxicity.py reports by default."""
    probabilities = torch.softmax(classifier_logits(reward_tokenizer, reward_model, texts, batch_size), -1)
    others = [i for i in range(probabilities.shape[1]) if i != reward_index]
    return probabilities[:, others].sum(1)


@torch.no_grad()
def response_logprobs(causal_lm, queries, responses, pad_token_id, batch_size):
    """(summed log-probability, token count) of each response's tokens given its query, under `causal_lm`."""
    device = next(causal_lm.parameters()).device
    sums, counts = [], []
    for start in range(0, len(queries), batch_size):
        pairs = [(q.cpu(), r.cpu()) for q, r in zip(queries[start:start + batch_size],
                                                     responses[start:start + batch_size])]
        width = max(len(q) + len(r) for q, r in pairs)
        ids = torch.full((len(pairs), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        is_response = torch.zeros_like(ids, dtype=torch.bool)
        for row, (q, r) in enumerate(pairs):  # padded on the right: the positions of real tokens stay 0, 1, ...
            ids[row, :len(q) + len(r)] = torch.cat([q, r])
            mask[row, :len(q) + len(r)] = 1
            is_response[row, len(q):len(q) + len(r)] = True
        logits = causal_lm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        sums += (logprobs * is_response[:, 1:].to(device)).sum(1).tolist()  # position t predicts token t + 1
        counts += is_response.sum(1).tolist()
    return sums, counts


def evaluate_heldout(ppo_trainer, tokenizer, eval_queries, samples_per_prompt, max_new_tokens, toxicity_fn,
                     batch_size, seed):
    """eval/... stats of the policy on the fixed held-out queries (a datasets.Dataset of build_queries):
    `samples_per_prompt` responses per query, sampled as in the rollout (top_k 0, top_p 1.0, cut after the first eos)
    with `max_new_tokens` tokens at most, `batch_size` at a time; scored by `toxicity_fn` (texts -> 1-d tensor in
    [0, 1]), and their mean log-probability per token under the frozen reference (a fluency proxy).

    Training must not notice it: the RNG states (python, numpy, torch, cuda) are restored afterwards, and so is
    every module's train/eval mode. The sampling is seeded by `seed`: every evaluation draws the same noise, so the
    curve moves with the policy, not with the draw."""
    from evaluate_toxicity import distinct_n  # the definition evaluate_toxicity.py reports

    t0 = time.perf_counter()
    rng = checkpoints.rng_state()
    policy = ppo_trainer.accelerator.unwrap_model(ppo_trainer.model)
    modes = {module: module.training for module in policy.modules()}
    try:
        torch.manual_seed(seed)
        policy.eval()  # measure the model itself (no dropout), whatever mode trl's last pass left
        queries = [q for q in eval_queries["input_ids"] for _ in range(samples_per_prompt)]
        responses = ppo_trainer.generate(queries, batch_size=batch_size, return_prompt=False,
                                         max_new_tokens=max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                         pad_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        toxicity = toxicity_fn(texts).double()
        # the reference: trl's frozen copy, or under LoRA the policy with its adapters disabled
        reference = ppo_trainer.model if ppo_trainer.is_peft_model else ppo_trainer.ref_model
        with ppo_trainer.optional_peft_ctx():
            sums, counts = response_logprobs(ppo_trainer.accelerator.unwrap_model(reference).pretrained_model,
                                             queries, responses, tokenizer.eos_token_id, batch_size)
    finally:
        for module, training in modes.items():
            module.training = training
        checkpoints.set_rng_state(rng)
    return {"eval/toxicity": float(toxicity.mean()),
            "eval/toxic_share": float((toxicity >= TOXIC_THRESHOLD).double().mean()),
            "eval/distinct_1": distinct_n(texts, 1), "eval/distinct_2": distinct_n(texts, 2),
            "eval/empty_share": float(np.mean([not t.strip() for t in texts])),
            "eval/ref_logprob": sum(sums) / sum(counts) if sum(counts) else float("nan"),
            "time/eval": time.perf_counter() - t0}


def is_eval_step(step, eval_every, total_steps):
    """Step 0 (before training), every `eval_every` steps and the last; never when eval_every is 0."""
    return bool(eval_every) and (step % eval_every == 0 or step == total_steps)


def log_step(run_log, progress, step, stats, batch, rewards, process_index, num_processes, heldout_toxicity=None):
    """Every process's episodes into samples.jsonl, the step's scalars into stats.jsonl; the progress bar (with the
    latest held-out toxicity, when there is one)."""
    from accelerate.utils import gather_object

    episodes = [{"step": step, "process": process_index, "query": q, "response": r, "reward": w}
                for q, r, w in zip(batch["query"], batch["response"], torch.stack(rewards).tolist())]
    if num_processes > 1:
        episodes = gather_object(episodes)
    summary = {"reward": float(np.mean([e["reward"] for e in episodes])), "kl": float(stats["objective/kl"])}
    scalars = {k: float(v) for k, v in stats.items() if np.ndim(v) == 0}
    run_log.write(step, {"env/reward_mean": summary["reward"], **scalars}, episodes)
    progress.update(1)
    heldout = {} if heldout_toxicity is None else {"heldout_tox": f"{heldout_toxicity:.3f}"}
    progress.set_postfix(reward=f"{summary['reward']:.3f}", kl=f"{summary['kl']:.3f}", **heldout)
    return summary


def plot_training_curves(stats_path, png_path):
    """Reward, KL and held-out toxicity against step, read back from stats.jsonl (so a resumed run's plot covers
    the whole run), into png_path."""
    from matplotlib.figure import Figure  # no pyplot: nothing global changes, and Agg draws it

    with open(stats_path) as f:
        lines = [json.loads(line) for line in f]
    steps = [s for s in lines if "env/reward_mean" in s]
    evals = [s for s in lines if "eval/toxicity" in s]
    fig = Figure(figsize=(6, 7), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for ax, rows, key, label in ((axes[0], steps, "env/reward_mean", "reward (mean)"),
                                 (axes[1], steps, "objective/kl", "KL to the reference"),
                                 (axes[2], evals, "eval/toxicity", "held-out toxicity")):
        ax.plot([s["step"] for s in rows], [s[key] for s in rows], marker="o" if rows is evals else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].set_ylim(bottom=0)
    axes[2].set_xlabel("PPO step")
    save_figure(fig, png_path)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    quiet_libraries(args.verbose, evaluate_library=False)
    with OutputLock(args.output_dir, "training"):  # one run at a time in an output folder; a second is refused
        train(args, argv)


def train(args, argv):
    checked = preflight(args)
    num_shared_layers = checked.num_shared_layers

    from accelerate import PartialState

    # Created before trl touches accelerate: without cpu=True, processes launched on a machine without
    # GPUs would each train alone instead of data-parallel over gloo.
    state = PartialState(cpu=not torch.cuda.is_available())
    resume = resume_point(args, checked.policy_config, state.is_main_process, state.wait_for_everyone)
    if resume and resume.num_processes != state.num_processes:  # each process's batches depend on the count
        fail(f"checkpoint {resume.path} was trained with {resume.num_processes} process(es), this run has "
             f"{state.num_processes}; resume with the same number of processes")
    # DeepSpeed (from the launch config): its micro batch, accumulation and precision are PPO's
    plugin = scale_out.deepspeed_plugin(args.mini_batch_size, args.gradient_accumulation_steps, DTYPES[args.dtype])
    scale_out.refuse_evaluation_under_zero3(plugin, args.eval_every)
    engine = scale_out.engine_name(plugin)
    if resume and resume.engine != engine:  # the optimizer's state is in the engine's own format
        fail(f"checkpoint {resume.path} was trained under {resume.engine}, this run is {engine}; resume with the "
             "same accelerate config")

    # Data: toxic prompts, a held-out share, queries of 10-15 tokens.
    kept = load_prompts(args.dataset, args.dataset_split, args.toxicity_threshold)
    train_rows, heldout_rows = split_prompts(kept, args.test_fraction, args.seed, args.batch_size * state.num_processes)
    if args.eval_every and not len(heldout_rows):
        fail(f"--eval-every evaluates on held-out prompts, and none were held out (of {len(kept)} kept rows); use "
             "more data or drop --eval-every")
    os.makedirs(args.output_dir, exist_ok=True)
    from transformers import AutoTokenizer
    from trl import set_seed

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    queries = build_queries(train_rows, tokenizer, args.min_context_tokens, args.max_context_tokens, args.seed)
    eval_queries = (choose_eval_queries(heldout_rows, args.eval_prompts, tokenizer, args.min_context_tokens,
                                        args.max_context_tokens, args.seed) if args.eval_every else None)
    if state.is_main_process and len(heldout_rows):
        write_atomic(os.path.join(args.output_dir, "heldout_prompts.jsonl"),
                     "".join(json.dumps(row) + "\n" for row in heldout_rows))

    # Models: policy with value head, the reference sharing its first blocks, trl's trainer, the reward classifier.
    lora_config = None
    if args.use_peft:
        from peft import LoraConfig

        lora_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 target_modules=args.lora_target_modules, bias="none", task_type="CAUSAL_LM")
    base = load_base_model(args.model, DTYPES[args.dtype], state.device, args.trust_remote_code, args.load_in_8bit,
                           args.load_in_4bit)
    model, ref_model = build_models(base, num_shared_layers, lora_config)
    # the reward classifiers load before the trainer: under ZeRO-3 accelerate's config would make from_pretrained
    # partition them, and no engine gathers them
    classifiers = []  # (name, tokenizer, model, class index, weight) of each reward term
    for (name, label, weight), index in zip(reward_terms(args.reward_model, args.reward_label, args.reward_weight),
                                            checked.reward_indices):
        classifiers.append((reward_name(name, label), *load_classifier(
            name, state.device, reward_dtype(args.reward_dtype, state.device)), index, weight))
    reward_fn = functools.partial(score_responses, classifiers, batch_size=args.reward_batch_size)
    # held-out toxicity: the first reward classifier's probability of its classes other than its reward label
    toxicity_fn = functools.partial(toxic_probability, classifiers[0][1], classifiers[0][2], classifiers[0][3],
                                    batch_size=args.reward_batch_size)
    total_steps = args.steps or len(queries) // (args.batch_size * state.num_processes)
    ppo_config = make_ppo_config(args, total_steps, {"deepspeed_plugin": plugin} if plugin else None)
    ppo_trainer = build_ppo_trainer(ppo_config, model, ref_model, tokenizer, num_shared_layers,
                                    args.frozen_prefix_cache, args.response_only_logits)
    accelerator = ppo_trainer.accelerator
    start_step = resume.step if resume else 0
    if start_step >= total_steps:
        fail(f"checkpoint {resume.path} is at step {start_step}, not below --steps {total_steps}; nothing to do")
    if resume and (saved_lr := checkpoints.load_checkpoint(ppo_trainer, resume, args.learning_rate)) != \
            args.learning_rate:
        state.print(f"--learning-rate {args.learning_rate} from here on (the checkpoint was trained at {saved_lr})")

    if state.is_main_process:
        write_atomic(os.path.join(args.output_dir, "training_args.json"), json.dumps(asdict(args), indent=2))
    trainable = sum(scale_out.num_elements(p) for p in model.parameters() if p.requires_grad)
    sharing = ("reference = the policy with adapters disabled" if args.use_peft else
               f"{num_shared_layers}/{num_blocks(checked.policy_config)} blocks shared with the reference")
    total = sum(scale_out.num_elements(p) for p in model.parameters())
    state.print(f"policy {args.model}: {total:,} parameters, {trainable:,} trainable; {sharing}; {len(queries)} "
                f"training prompts, {len(heldout_rows)} held out; {total_steps} "
                f"steps of {args.batch_size} x {state.num_processes} process(es) = "
                f"{args.batch_size * state.num_processes} episodes"
                + (f"; resuming from {resume.path} at step {start_step}" if resume else "")
                + (f"; evaluating {len(eval_queries)} held-out prompts x {args.eval_samples_per_prompt} at step 0, "
                   f"every {args.eval_every} steps and the last" if args.eval_every else ""))

    def save(name, step, summary):
        card = checkpoints.model_card(args, num_shared_layers, step, summary, heldout_curve)
        path = os.path.join(args.output_dir, name)
        checkpoints.save_checkpoint(ppo_trainer, tokenizer, path, step, asdict(args), card, engine)
        if name.startswith("checkpoint-") and state.is_main_process and args.save_total_limit:
            checkpoints.prune_checkpoints(args.output_dir, args.save_total_limit)
        return path

    def evaluate(step):
        """The step's eval/... stats on the main process ({} elsewhere, and at steps without an evaluation): the
        other processes go on meanwhile, and nothing of theirs changes."""
        if not (state.is_main_process and is_eval_step(step, args.eval_every, total_steps)):
            return {}
        stats = evaluate_heldout(ppo_trainer, tokenizer, eval_queries, args.eval_samples_per_prompt,
                                 args.max_new_tokens, toxicity_fn, args.batch_size, args.seed)
        heldout_curve.append((step, stats["eval/toxicity"]))
        return stats

    from tqdm.auto import tqdm

    run_log = checkpoints.RunLog(args.output_dir, resume.step if resume else None, state.is_main_process)
    progress = tqdm(total=total_steps, initial=start_step, desc="PPO", disable=not state.is_main_process,
                    dynamic_ncols=True)
    health = PPOHealth.from_stats(run_log.kept_stats)
    heldout_curve = [(s["step"], s["eval/toxicity"]) for s in run_log.kept_stats if "eval/toxicity" in s]
    stop = checkpoints.StopRequest()
    summary = None
    try:  # the progress bar and log files close before any error line is printed
        if start_step == 0 and (before := evaluate(0)):  # the policy as loaded: a line of its own in stats.jsonl
            run_log.write(0, {"eval": True, **before}, [])
            accelerator.log(before, step=0 if args.log_with == "tensorboard" else None)  # trl's step rule
            progress.set_postfix(heldout_tox=f"{before['eval/toxicity']:.3f}")
        for step in range(start_step + 1, total_steps + 1):
            # data: this process's rows of the step, and the response length drawn for each
            rows = queries[batch_indices(step - 1, len(queries), args.batch_size, state.num_processes,
                                         state.process_index, args.seed)]
            batch = {"input_ids": list(rows["input_ids"]), "query": rows["query"]}
            lengths = response_lengths(step, len(batch["query"]), args.min_new_tokens, args.max_new_tokens,
                                       args.seed, state.process_index)
            # rollout -> reward -> PPO update
            stats, responses, rewards = ppo_step(ppo_trainer, tokenizer, reward_fn, batch, lengths, step)
            # held-out evaluation, then log and save
            stats.update(evaluate(step))
            stats.update(health.update(stats))
            ppo_trainer.log_stats(stats, batch, rewards)
            summary = log_step(run_log, progress, step, stats, batch, rewards, state.process_index,
                               state.num_processes, heldout_curve[-1][1] if heldout_curve else None)
            if stop.agreed(accelerator) and step < total_steps:
                path = save(f"checkpoint-{step}", step, summary)
                raise SystemExit(stop.message(step, total_steps, path, argv))
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                save(f"checkpoint-{step}", step, summary)
        progress.close()
        final = save("final", total_steps, summary)  # a first signal now lets the save finish
    finally:
        stop.restore()
        progress.close()
        run_log.close()
    accelerator.end_training()
    state.print(f"saved {final} after {total_steps} steps"
                + (f" ({signal.Signals(stop.signal).name} came during the last step or the final save, which finished)"
                   if stop.signal else ""))
    for line in health.report(args.ratio_threshold):
        state.print(line)
    if state.is_main_process and args.eval_every:
        curves = os.path.join(args.output_dir, "training_curves.png")
        plot_training_curves(os.path.join(args.output_dir, "stats.jsonl"), curves)
        print(f"held-out toxicity {heldout_curve[0][1]:.3f} at step {heldout_curve[0][0]}, "
              f"{heldout_curve[-1][1]:.3f} at step {heldout_curve[-1][0]}; curves in {curves}")
    if state.is_main_process and args.merge_adapters:
        final = os.path.join(args.output_dir, "final-merged")
        checkpoints.save_merged(ppo_trainer, tokenizer, final,
                                checkpoints.model_card(args, num_shared_layers, total_steps, summary, heldout_curve))
        print(f"saved {final}: the adapters merged into a plain {args.model}")
    if state.is_main_process and args.push_to_hub:
        checkpoints.push_to_hub(final, args.push_to_hub)


if __name__ == "__main__":
    sys.exit(main())
