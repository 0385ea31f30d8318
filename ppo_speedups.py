"""What detox changes in how trl 0.11.4, accelerate and transformers behave, each under a name that says so.

- `SpeedupPPOTrainer`, a subclass of trl's `PPOTrainer` that overrides trl's own `step` and `batched_forward_pass`:
  - the frozen-prefix cache: the blocks the policy shares with the reference are frozen and run without dropout, so
    their output for a row is the same in all 2 + ppo_epochs passes of a step; they run once per row and step;
  - response-only logits: after the policy's first pass, the LM head runs only where trl reads its logits;
  - the contiguous LM-head input (a forward pre-hook);
  - `speedups_only(...)`, the documented switch back to trl's plain PPOTrainer (the benchmark and tests use it).
- `ValueHeadModel`, trl's value-head model whose forward can start after the shared blocks.
- Fixes: `checkpoint_while_training` (gradient checkpointing under trl's eval-mode passes), `frozen_models_skip_ddp`
  (a frozen reference on multi-CPU runs), and for DeepSpeed the trainer's `_prepare_deepspeed` (no engine for the
  frozen reference below ZeRO-3) and `_generate_batched` (ZeRO-3 generation on deepspeed >= 0.16.4).
"""

import contextlib
import math

import torch
from trl import AutoModelForCausalLMWithValueHead, PPOTrainer
from trl.core import PPODecorators, logprobs_from_logits, masked_mean

import scale_out

# Architectures whose block loop the speed-ups replay: (blocks, final norm). Others run trl's plain passes.
LAYOUTS = {"gpt_neo": ("transformer.h", "transformer.ln_f"), "gptj": ("transformer.h", "transformer.ln_f")}
SPEEDUPS = {"head": "contiguous LM-head input", "prefix": "frozen-prefix cache", "logits": "response-only logits",
            "adam": "fused Adam"}


class _FirstBlockReached(Exception):
    def __init__(self, hidden_states, kwargs):
        super().__init__()
        self.hidden_states, self.kwargs = hidden_states, kwargs


def _stop_at_first_block(module, args, kwargs):
    raise _FirstBlockReached(args[0], kwargs)


class SharedHiddenRecorder:
    """Collects the shared blocks' output of the policy's first pass. Not a list: DistributedDataParallel copies
    lists among a forward's arguments, and the copies would be filled instead."""

    def __init__(self):
        self.hidden = []


class ValueHeadModel(AutoModelForCausalLMWithValueHead):
    """trl's AutoModelForCausalLMWithValueHead; with `shared_hidden`, `record_shared` or `logit_positions` its forward
    runs the block loop itself (same calls as transformers', so the same numbers):

    - the embeddings and the masks and positions every block receives come from transformers' own forward, stopped
      at the first block;
    - shared_hidden: block `num_shared_layers - 1`'s output for these rows; the shared blocks are skipped;
    - record_shared: a SharedHiddenRecorder that receives that output (the policy's first pass);
    - logit_positions: flat (row * length + position) indices; the head runs there only, zeros elsewhere.
    """

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, return_past_key_values=False,
                shared_hidden=None, record_shared=None, num_shared_layers=0, logit_positions=None, **kwargs):
        if shared_hidden is None and record_shared is None and logit_positions is None:
            return super().forward(input_ids, past_key_values, attention_mask, return_past_key_values, **kwargs)
        model = self.pretrained_model
        blocks_path, norm_path = LAYOUTS[model.config.model_type]
        blocks = model.get_submodule(blocks_path)
        handle = blocks[0].register_forward_pre_hook(_stop_at_first_block, with_kwargs=True)
        try:
            # the model's default use_cache, as in trl's call: with a key/value cache the attention's backward takes
            # other memory layouts, so another choice would round gradients differently
            model.base_model(input_ids=input_ids, attention_mask=attention_mask)
            raise RuntimeError("the model's forward never reached its first block")
        except _FirstBlockReached as reached:
            hidden, block_kwargs = reached.hidden_states, reached.kwargs
        finally:
            handle.remove()
        start = 0
        if shared_hidden is not None:
            hidden, start = shared_hidden, num_shared_layers
        for i in range(start, len(blocks)):
            if i == num_shared_layers and record_shared is not None:
                record_shared.hidden.append(hidden.detach())
            out = blocks[i](hidden, **block_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = model.get_submodule(norm_path)(hidden)
        head = model.get_output_embeddings()
        if logit_positions is None:
            logits = head(hidden)
        else:
            batch, length = hidden.shape[:2]
            read = head(hidden.flatten(0, 1).index_select(0, logit_positions))  # [positions, vocab]
            logits = read.new_zeros(batch * length, read.shape[-1]).index_copy(0, logit_positions, read)
            logits = logits.view(batch, length, -1)
        value = self.v_head(hidden.to(self.v_head.summary.weight.device)).squeeze(-1)
        return logits.float(), None, value


def contiguous_head_input(module, args):
    """Forward pre-hook for the LM head. generate() feeds it hidden_states[:, -1:, :], a strided slice, and torch
    folds [batch, 1, hidden] @ W.T into one matmul only if W requires grad or the input is contiguous; a frozen head
    (gpt-neo ties it to the shared embeddings) instead takes bmm over W expanded to the batch: a copy of
    batch x vocab x hidden elements at every generate."""
    return (args[0].contiguous(),) + tuple(args[1:])


def checkpoint_while_training(layer, args):
    """Fix for --gradient-checkpointing under trl 0.11.4: `PPOTrainer.batched_forward_pass` calls `model.eval()`
    before every pass (trl/trainer/ppo_trainer.py, line 1014), and transformers checkpoints a layer only in training
    mode, so the flag never acted. A forward pre-hook on the checkpointed layers marks the layer itself as training
    while gradients are on; the dropout modules inside it keep eval mode."""
    layer.training = torch.is_grad_enabled()


@contextlib.contextmanager
def frozen_models_skip_ddp(distributed_type):
    """Fix for multi-CPU runs: trl prepares the frozen reference with accelerator.prepare, and on MULTI_CPU accelerate
    wraps even a model without trainable parameters in DistributedDataParallel, which torch refuses (its multi-GPU
    path already skips such models). Only there, a fully frozen model is prepared as evaluation-only while the
    trainer is built; everywhere else nothing changes."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if distributed_type != DistributedType.MULTI_CPU:
        yield
        return
    original = Accelerator.prepare_model

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        frozen = not any(p.requires_grad for p in model.parameters())
        return original(self, model, device_placement=device_placement, evaluation_mode=evaluation_mode or frozen)

    Accelerator.prepare_model = prepare_model
    try:
        yield
    finally:
        Accelerator.prepare_model = original


class SpeedupPPOTrainer(PPOTrainer):
    """trl's PPOTrainer with the speed-ups of BENCHMARKS.md; the same update (bit for bit with the frozen-prefix
    cache alone, to float rounding with the others).

    speedups: the names of SPEEDUPS to use (all by default). "prefix" and "logits" need a reference model and an
    architecture of LAYOUTS (others run trl's passes); without "adam" the optimizer is trl's own Adam.
    `speedups_only(...)` switches them off for a while; `speedups_only()` is trl's plain trainer.

    Within one step trl builds the lists of query and response tensors once and slices them for every pass, so a
    pass's rows are found by the identity of those tensors: no token comparison, no host sync.
    """

    def __init__(self, config, model, ref_model, tokenizer, num_shared_layers, speedups=tuple(SPEEDUPS)):
        from accelerate import PartialState

        trainable = [p for p in model.parameters() if p.requires_grad]
        # trl's own (None): Adam with torch's defaults; DeepSpeed's CPU Adam with the optimizer offloaded
        optimizer = scale_out.cpu_adam(trainable, config.learning_rate, config.accelerator_kwargs.get(
            "deepspeed_plugin"))
        if optimizer is None and "adam" in speedups:  # the same update as trl's Adam, without foreach temporaries
            device = next(model.parameters()).device
            optimizer = torch.optim.Adam(trainable, lr=config.learning_rate,
                                         fused=device.type in ("cuda", "cpu"))
        with frozen_models_skip_ddp(PartialState().distributed_type):
            super().__init__(config, model, ref_model, tokenizer, optimizer=optimizer)
        self.num_shared_layers = num_shared_layers
        policy = self.accelerator.unwrap_model(self.model)
        replayable = (ref_model is not None and isinstance(policy, ValueHeadModel)
                      and policy.pretrained_model.config.model_type in LAYOUTS)
        self.available_speedups = frozenset(s for s in speedups if replayable or s not in ("prefix", "logits"))
        self.speedups = self.available_speedups
        self._lm_head = policy.pretrained_model.get_output_embeddings()
        self._head_hook = self._lm_head.register_forward_pre_hook(contiguous_head_input) if "head" in speedups else None
        self._optimizers = {"adam": self.optimizer, "trl": None}
        if config.gradient_checkpointing:  # trl enabled it on the policy's layers; make it act under trl's eval mode
            for layer in policy.modules():
                if getattr(layer, "gradient_checkpointing", False):
                    layer.register_forward_pre_hook(checkpoint_while_training)
        self._step_rows = None  # inside step(): the step's rows, see batched_forward_pass
        self._minibatch_counts = None  # inside step(): skipped and all mini-batches, see loss

    def _prepare_deepspeed(self, model):
        """Fix for DeepSpeed ZeRO-0/1/2: trl wraps the frozen reference in a DeepSpeed engine of its own, and to
        make it stage 0 it rewrites, in place, the stage of the very config that the policy's engine and
        accelerate's saving read. A frozen model needs no engine: it goes to the device for evaluation, as under
        DDP. ZeRO-3 partitions it with the policy (trl's way)."""
        if scale_out.zero_stage(self.accelerator) != 3:
            return model.to(self.accelerator.device).eval()
        return super()._prepare_deepspeed(model)

    def _generate_batched(self, model, query_tensors, length_sampler=None, batch_size=4, return_prompt=True,
                          pad_to_multiple_of=None, remove_padding=True, **generation_kwargs):
        """Fix for ZeRO-3 on deepspeed >= 0.16.4: trl's _generate_batched, step for step, with the policy
        unwrapped by scale_out.gathered_for_generation instead of trl's unwrap_model_for_generation (which fails on
        leaving). Elsewhere trl's own."""
        if scale_out.zero_stage(self.accelerator) != 3:
            return super()._generate_batched(model, query_tensors, length_sampler, batch_size, return_prompt,
                                             pad_to_multiple_of, remove_padding, **generation_kwargs)
        outputs = []
        padding_side_default = self.tokenizer.padding_side
        if not self.is_encoder_decoder:
            self.tokenizer.padding_side = "left"
        batch_size = min(len(query_tensors), batch_size)
        for i in range(0, len(query_tensors), batch_size):
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            batch = query_tensors[i:min(len(query_tensors), i + batch_size)]
            inputs = {"input_ids": batch, "attention_mask": [torch.ones_like(element) for element in batch]}
            padded_inputs = self.tokenizer.pad(inputs, padding=True, max_length=None,
                                               pad_to_multiple_of=pad_to_multiple_of,
                                               return_tensors="pt").to(self.current_device)
            with scale_out.gathered_for_generation(model, self.accelerator) as unwrapped_model:
                generations = unwrapped_model.generate(**padded_inputs, **generation_kwargs)
            for generation, mask in zip(generations, padded_inputs["attention_mask"]):
                output = generation[(1 - mask).sum():] if not self.is_encoder_decoder else generation
                if not return_prompt and not self.is_encoder_decoder:
                    output = output[mask.sum():]
                if remove_padding and self.tokenizer.eos_token_id in output:
                    pad_start = torch.nonzero(output == self.tokenizer.eos_token_id, as_tuple=False)[0, 0].item()
                    output = output[:pad_start + 1]
                outputs.append(output)
        self.tokenizer.padding_side = padding_side_default
        return outputs

    @contextlib.contextmanager
    def speedups_only(self, names=()):
        """Use only these speed-ups for a while (none: trl's PPOTrainer as it is); then the previous ones again."""
        previous = self.speedups
        self._use(frozenset(names) & self.available_speedups)
        try:
            yield
        finally:
            self._use(previous)

    def _use(self, speedups):
        self.speedups = speedups
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None
        if "head" in speedups:
            self._head_hook = self._lm_head.register_forward_pre_hook(contiguous_head_input)
        if "adam" in self.available_speedups:
            if "adam" not in speedups and self._optimizers["trl"] is None:  # trl's default optimizer, made once
                group = self._optimizers["adam"].param_groups[0]
                self._optimizers["trl"] = self.accelerator.prepare_optimizer(
                    torch.optim.Adam(group["params"], lr=group["lr"]))
            self.optimizer = self._optimizers["adam" if "adam" in speedups else "trl"]

    def step(self, queries, responses, scores, response_masks=None):
        """trl's step, with ppo/skipped_batches and ppo/minibatches in its stats (see `loss`)."""
        self._minibatch_counts = {"ppo/skipped_batches": 0, "ppo/minibatches": 0}
        if not self.speedups & {"prefix", "logits"}:
            return super().step(queries, responses, scores, response_masks) | self._minibatch_counts
        self._step_rows = {}
        try:
            return super().step(queries, responses, scores, response_masks) | self._minibatch_counts
        finally:  # nothing is kept from one step to the next
            self._step_rows = None

    def loss(self, old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns):
        """trl's loss, counting the mini-batches it skips: when a mini-batch's average probability ratio is above
        config.ratio_threshold, trl zeroes its losses and only warns. The count applies trl's own test to trl's own
        ratio (a health count, not a speed-up: on with or without them)."""
        pg_loss, vf_loss, stats = super().loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages,
                                               returns)
        counts = self._minibatch_counts
        if counts is not None:  # None outside step()
            counts["ppo/minibatches"] += 1
            counts["ppo/skipped_batches"] += int(masked_mean(stats["policy/ratio"], mask).item()
                                                 > self.config.ratio_threshold)
        return pg_loss, vf_loss, stats

    def _first_pass(self, queries, responses, model_inputs):
        """At the step's first pass (the policy's, over all rows in order): each row's index by its tensors, and the
        positions whose logits trl reads (start = query length - 1 after any left padding, as trl's mask)."""
        masks = model_inputs["attention_mask"].cpu()  # the one host sync of the step
        positions = torch.zeros(masks.shape, dtype=torch.bool)
        for k, (query, response) in enumerate(zip(queries, responses)):
            start = int(masks[k].nonzero()[0]) + len(query) - 1
            positions[k, start:start + len(response)] = True
        self._step_rows = {"index": {(id(q), id(r)): k for k, (q, r) in enumerate(zip(queries, responses))},
                           "positions": positions, "recorder": SharedHiddenRecorder(), "hidden": None}

    @PPODecorators.empty_device_cache()
    def batched_forward_pass(self, model, queries, responses, model_inputs, return_logits=False,
                             response_masks=None):
        """trl's batched_forward_pass (same mini-batches, outputs and masks); the model runs with the speed-ups."""
        if self._step_rows is None:
            return super().batched_forward_pass(model, queries, responses, model_inputs, return_logits,
                                                response_masks)
        first = not self._step_rows
        if first:
            self._first_pass(queries, responses, model_inputs)
        table = self._step_rows
        rows = torch.tensor([table["index"][id(q), id(r)] for q, r in zip(queries, responses)])
        skip = "prefix" in self.speedups and self.num_shared_layers > 0
        fbs = self.config.mini_batch_size
        all_logprobs, all_logits, all_masks, all_values = [], [], [], []
        model.eval()
        for i in range(math.ceil(len(queries) / fbs)):
            input_kwargs = {key: value[i * fbs:(i + 1) * fbs] for key, value in model_inputs.items()}
            input_ids, attention_mask = input_kwargs["input_ids"], input_kwargs["attention_mask"]
            chunk = rows[i * fbs:(i + 1) * fbs]
            extra = {}  # none: trl's own forward
            if first and skip:  # the policy's first pass records the shared blocks' output, row by row
                extra = {"record_shared": table["recorder"], "num_shared_layers": self.num_shared_layers}
            elif not first:
                if skip:
                    extra = {"shared_hidden": table["hidden"].index_select(0, chunk.to(input_ids.device)),
                             "num_shared_layers": self.num_shared_layers}
                if "logits" in self.speedups:
                    extra["logit_positions"] = table["positions"][chunk].flatten().nonzero().squeeze(1).to(
                        input_ids.device, non_blocking=True)
            logits, _, values = model(**input_kwargs, **extra)
            logprobs = logprobs_from_logits(logits[:, :-1, :], input_ids[:, 1:])
            masks = torch.zeros_like(attention_mask)
            masks[:, :-1] = attention_mask[:, 1:]
            masks *= table["positions"][chunk].to(masks.device, non_blocking=True)  # trl's mask: cut to the response
            if response_masks is not None:
                for j, response_mask in enumerate(response_masks[i * fbs:(i + 1) * fbs]):
                    start = int(table["positions"][chunk[j]].nonzero()[0])
                    masks[j, start:start + len(response_mask)] *= response_mask
            if return_logits:
                all_logits.append(logits)
            else:
                del logits
            all_values.append(values)
            all_logprobs.append(logprobs)
            all_masks.append(masks)
        if first and skip:
            table["hidden"] = torch.cat(table.pop("recorder").hidden)
        return (torch.cat(all_logprobs), torch.cat(all_logits)[:, :-1] if return_logits else None,
                torch.cat(all_values)[:, :-1], torch.cat(all_masks)[:, :-1])
