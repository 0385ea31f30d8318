"""DeepSpeed under `accelerate launch --config_file configs/accelerate/deepspeed_*.yaml`: what PPO needs from it.

The YAML picks the engine (ZeRO stage, offload); the PPO arguments fix the rest, so a run means the same thing
under DDP and under DeepSpeed:
- DeepSpeed's micro batch is trl's PPO mini-batch and its gradient accumulation is --gradient-accumulation-steps
  (trl passes no dataloader, and accelerate cannot fill `train_micro_batch_size_per_gpu` without one);
- no gradient clipping, as trl's PPOConfig (accelerate's `auto` would clip at 1.0);
- the precision is --dtype's: a bfloat16 policy trains in pure bfloat16 (weights, gradients and Adam moments, as
  under DDP), a float32 one in float32; mixed precision only if the launch config asks for it.
"""

import contextlib
import os

import torch

from detox_common import fail


def launched_with_deepspeed():
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def refuse_untested_under_deepspeed(use_peft, gradient_checkpointing):
    """What has not run under DeepSpeed is refused there, before anything loads."""
    untested = [flag for flag, used in (("--use-peft", use_peft), ("--gradient-checkpointing",
                                                                    gradient_checkpointing)) if used]
    if untested and launched_with_deepspeed():
        fail(f"{' and '.join(untested)} under DeepSpeed has not been tested; launch with "
             "configs/accelerate/multi_gpu_ddp.yaml for it, or drop it")


def refuse_evaluation_under_zero3(plugin, eval_every):
    """The held-out evaluation runs on the main process alone, and under ZeRO-3 every forward pass gathers weights
    from all processes: it would wait for the others forever."""
    if eval_every and plugin is not None and plugin.zero_stage == 3:
        fail("--eval-every does not run under ZeRO-3 (the held-out evaluation runs on the main process alone, and "
             "ZeRO-3 needs every process to gather the weights); drop it and measure the checkpoints with "
             "evaluate_toxicity.py, or use a ZeRO-2 config")


def deepspeed_plugin(mini_batch_size, gradient_accumulation_steps, dtype):
    """The DeepSpeedPlugin of this launch (None when not launched with a DeepSpeed config), with PPO's batch,
    accumulation and precision written into its config. For trl's PPOConfig(accelerator_kwargs=...)."""
    if not launched_with_deepspeed():
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(gradient_accumulation_steps=gradient_accumulation_steps)
    config = plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": mini_batch_size,
              "gradient_accumulation_steps": gradient_accumulation_steps, "gradient_clipping": 0.0}
    for key, value in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            fail(f"the DeepSpeed config sets {key} to {config[key]}, and PPO sets it to {value} (from "
                 "--mini-batch-size and --gradient-accumulation-steps); remove it from the config or set it to auto")
        config[key] = value
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed == "no" and not any(str(config.get(k, {}).get("enabled", False)).lower() == "true"
                                 for k in ("bf16", "fp16")):
        if dtype == torch.float16:
            fail("--dtype float16 under DeepSpeed needs fp16 loss scaling; use --dtype bfloat16 or float32, or "
                 "mixed_precision: fp16 in the launch config")
        if dtype == torch.bfloat16:  # pure bf16: no float32 master copy, as the policy trains under DDP
            config["bf16"] = {"enabled": True, "bf16_master_weights_and_grads": True,
                              "bf16_optimizer_states": True}
    if offloads_optimizer(plugin):  # the optimizer is built by cpu_adam, with the precision above
        config["zero_force_ds_cpu_optimizer"] = False
    if plugin.zero_stage == 3:  # a checkpoint holds whole weights, gathered when it is saved
        plugin.zero3_save_16bit_model = True
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    return plugin


def offloads_optimizer(plugin):
    offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {})
    return offload.get("device", "none") not in ("none", None)


def cpu_adam(params, lr, plugin):
    """With the optimizer offloaded to CPU: DeepSpeed's CPU Adam (Adam, not AdamW: trl's update), its moments in
    bf16 when the run is pure bf16. accelerate would build it with float32 moments, which DeepSpeed refuses
    there. None otherwise."""
    if plugin is None or not offloads_optimizer(plugin):
        return None
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    pure_bf16 = plugin.deepspeed_config.get("bf16", {}).get("bf16_optimizer_states", False)
    return DeepSpeedCPUAdam(params, lr=lr, adamw_mode=False, fp32_optimizer_states=not pure_bf16)


def engine_name(plugin):
    """"ddp" (one process too) or "deepspeed-zeroN[-offload]", as checkpoints record it."""
    if plugin is None:
        return "ddp"
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    offload = any(zero.get(k, {}).get("device", "none") not in ("none", None)
                  for k in ("offload_optimizer", "offload_param"))
    return f"deepspeed-zero{plugin.zero_stage}" + ("-offload" if offload else "")


def zero_stage(accelerator):
    """The ZeRO stage of this run; None when it does not run under DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


@contextlib.contextmanager
def gathered_for_generation(engine, accelerator):
    """The policy of a ZeRO-3 engine, its weights gathered once for a whole generate call and DeepSpeed's
    per-module hooks off meanwhile: trl's unwrap_model_for_generation, whose re-adding of the hooks calls
    `_register_hooks_recursively`, which deepspeed 0.16.4 renamed `_register_deepspeed_module`."""
    import deepspeed
    from trl.models.utils import remove_hooks

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(engine.parameters())):
        remove_hooks(engine)
        try:
            yield accelerator.unwrap_model(engine)
        finally:
            register = getattr(offload, "_register_deepspeed_module", None) or offload._register_hooks_recursively
            register(offload.module)


def partitioned(param):
    """Whether ZeRO-3 holds only a slice of this parameter on each process (then `param` itself is empty)."""
    return hasattr(param, "ds_tensor") and not getattr(param, "ds_persist", False)


def local_values(param):
    """What this process holds of a parameter: its ZeRO-3 slice, or the whole tensor."""
    return param.ds_tensor if partitioned(param) else param


def num_elements(param):
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def gathered_state_dict(ppo_trainer):
    """Under ZeRO-3 the policy-with-value-head's whole state dict, gathered module by module onto the main
    process's CPU ({} on the others; every process must call it, and it must be called with the same models on all);
    None elsewhere, where every process holds whole weights."""
    if zero_stage(ppo_trainer.accelerator) != 3:
        return None
    return ppo_trainer.accelerator.get_state_dict(ppo_trainer.model) or {}


def load_whole_weights(module, weights):
    """Copy whole tensors `weights` (name -> tensor, every process reads the same file) into `module`'s parameters
    and buffers, one parameter at a time: under ZeRO-3 each is gathered, written on process 0 and partitioned
    again, so no more than one whole parameter is ever held."""
    import deepspeed

    for name, param in module.named_parameters():
        if name not in weights:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                param.data.copy_(weights[name])
    for name, buffer in module.named_buffers():
        if name in weights:
            buffer.data.copy_(weights[name])
