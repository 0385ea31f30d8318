"""Checkpoints and faults of detoxify_ppo.py: save, find, check, load and prune checkpoints; RNG state; the replica
check; free disk; stopping on a signal; the stats/samples logs; the model card; merged LoRA saves and hub upload."""

import ctypes
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

import scale_out
from detox_common import CARD_RESULTS_END, CARD_RESULTS_START, fail, fsync_folder, reward_terms

# What a checkpoint must hold to resume; anything missing or unreadable is reported by name.
CHECKPOINT_FILES = ["config.json", "model.safetensors", "value_head.safetensors", "trainer_state.json",
                    "rng_state_0.pth", "training_args.json"]  # and optimizer_files()
LORA_FILES = {"config.json": "adapter_config.json", "model.safetensors": "adapter_model.safetensors"}


@dataclass(frozen=True)
class ResumePoint:
    """A checked checkpoint to resume from."""
    path: str
    step: int
    kl_coef: float
    num_processes: int
    engine: str  # "ddp" (one process too) or "deepspeed-zeroN": the optimizer's format


def optimizer_files(engine, num_processes):
    """DDP: one optimizer.pt (every process holds the whole state). DeepSpeed: each process's own partition."""
    if engine.startswith("deepspeed"):
        return [f"optimizer_{i}.pt" for i in range(num_processes)]
    return ["optimizer.pt"]


# ---------------------------------------------------------------------------------------------- RNG, replicas, disk
def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_replicas_agree(accelerator, model, step):
    """Data-parallel processes must hold the same weights; checked (one float per process) before each save. Under
    ZeRO-3 only the parameters it keeps whole on every process are replicas; the partitioned ones are gathered
    whole by the save (and said so), as no copy of them exists to compare."""
    if accelerator.num_processes == 1:
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    replicas = [p for p in trainable if not scale_out.partitioned(p)]
    checksum = sum((p.detach().double().sum() for p in replicas), torch.zeros((), dtype=torch.float64))
    sums = accelerator.gather(checksum.to(accelerator.device).reshape(1)).tolist()
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        fail(f"weights differ across processes at step {step} ({sums}); not saving")
    if len(replicas) == len(trainable):
        accelerator.print(f"step {step}: trainable weights identical on all {len(sums)} processes")
    else:
        accelerator.print(f"step {step}: {len(replicas)} replicated trainable tensors identical on all {len(sums)} "
                          f"processes; {len(trainable) - len(replicas)} partitioned ones (ZeRO-3) gathered whole")


def check_disk(output_dir, existing_folder, need_bytes):
    """Free space for one checkpoint on the disk of output_dir (whose nearest existing folder is existing_folder)."""
    free = shutil.disk_usage(existing_folder).free
    if free < need_bytes:
        fail(f"--output-dir {output_dir} has {free / 1e9:.2f} GB free but one checkpoint needs about "
             f"{need_bytes / 1e9:.2f} GB; free some space or pick another folder")


# ---------------------------------------------------------------------------------------------- save
def fsync_tree(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def floating_tensors(state):
    """Every floating-point tensor in a (nested) state dict: torch's optimizers' and DeepSpeed's partitions."""
    if torch.is_tensor(state):
        return [state] if state.is_floating_point() else []
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in floating_tensors(item)]
    return []


def check_state_finite(ppo_trainer, model, step):
    """Nothing non-finite is ever saved: the trainable weights, the value head, the optimizer state and the KL
    coefficient are checked first (check_finite in detoxify_ppo.py sees only the step's statistics, computed
    before its last update)."""
    parts = {"policy weights": [scale_out.local_values(p) for p in model.pretrained_model.parameters()
                                if p.requires_grad],
             "value head": [scale_out.local_values(p) for p in model.v_head.parameters()],
             "optimizer state": floating_tensors(ppo_trainer.optimizer.state_dict())}
    bad = [name for name, tensors in parts.items() if not all(torch.isfinite(t).all() for t in tensors)]
    if not np.isfinite(float(ppo_trainer.kl_ctl.value)):
        bad.append(f"KL coefficient ({float(ppo_trainer.kl_ctl.value)})")
    if bad:
        fail(f"non-finite {' and '.join(bad)} at step {step}; stopped without saving, the last checkpoint in the "
             "output folder is intact (try a lower --learning-rate or --dtype float32)")


def exchange(a, b):
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or file system can't."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), b)


def replace_folder(new, path):
    """Put the finished folder `new` (PATH.tmp) at PATH with no moment where PATH is missing: swapped in one step,
    then the old one removed. Where a swap is impossible, PATH goes to PATH.old first, and recover_folders puts it
    back should a crash fall in between."""
    if os.path.exists(path) and exchange(new, path):
        shutil.rmtree(new)  # now the old folder
    else:
        old = f"{path}.old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_folder(os.path.dirname(path) or ".")


def recover_folders(output_dir):
    """Leftovers of a save that was cut short: PATH.tmp is never whole (or is an old copy swapped out) and goes;
    PATH.old goes once PATH exists, and otherwise is PATH, whole, and is put back. Returns what it did."""
    done = []
    if not os.path.isdir(output_dir):
        return done
    for name in sorted(os.listdir(output_dir)):
        m = re.fullmatch(r"(checkpoint-\d+|final|final-merged)\.(tmp|old)", name)
        if not m:
            continue
        leftover, path = os.path.join(output_dir, name), os.path.join(output_dir, m.group(1))
        if m.group(2) == "old" and not os.path.exists(path):
            os.replace(leftover, path)
            done.append(f"put {m.group(1)} back from {name}")
        else:
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(f"removed {name}")
    return done


def save_checkpoint(ppo_trainer, tokenizer, path, step, training_args, card, engine="ddp"):
    """Write everything a resume needs into PATH.tmp, flush it, then swap it in: a crash leaves the old one whole.

    PATH holds a plain causal LM in safetensors (AutoModelForCausalLM.from_pretrained(PATH) loads it), its
    tokenizer, the value head (float32, as trl keeps it), the optimizer, the KL controller, the step, every
    process's RNG state, `training_args` (a dict) as training_args.json and `card` as README.md. Under DeepSpeed
    (`engine` "deepspeed-zeroN") each process writes its own optimizer partition.
    """
    from safetensors.torch import save_file

    accelerator = ppo_trainer.accelerator
    model = accelerator.unwrap_model(ppo_trainer.model)
    check_state_finite(ppo_trainer, model, step)
    check_replicas_agree(accelerator, model, step)
    tmp = f"{path}.tmp"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        torch.save(rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pth"))
        optimizer_file = optimizer_files(engine, accelerator.num_processes)
        if len(optimizer_file) > 1:  # this process's partition of a sharded optimizer
            torch.save(ppo_trainer.optimizer.state_dict(), os.path.join(tmp, optimizer_file[accelerator.process_index]))
        gathered = scale_out.gathered_state_dict(ppo_trainer)  # ZeRO-3: whole weights on the main process
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            policy, value_head = model.pretrained_model.state_dict(), model.v_head.state_dict()
            if gathered is not None:
                policy, value_head = ({k.removeprefix(prefix): v for k, v in gathered.items() if k.startswith(prefix)}
                                      for prefix in ("pretrained_model.", "v_head."))
            model.pretrained_model.save_pretrained(tmp, state_dict=policy, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in value_head.items()}, os.path.join(tmp, "value_head.safetensors"))
            if len(optimizer_file) == 1:
                torch.save(ppo_trainer.optimizer.state_dict(), os.path.join(tmp, optimizer_file[0]))
            state = {"step": step, "kl_coef": float(ppo_trainer.kl_ctl.value),
                     "num_processes": accelerator.num_processes, "engine": engine}
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f)
            with open(os.path.join(tmp, "training_args.json"), "w") as f:
                json.dump(training_args, f, indent=2)
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(card)
            fsync_tree(tmp)
            replace_folder(tmp, path)
    except Exception as e:  # a full disk or a failing write: torch and safetensors wrap the OSError in their own
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"cannot save {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the checkpoints "
             "saved before are intact: free some space, then run the same command with --resume-from-checkpoint auto")
    accelerator.wait_for_everyone()


def save_merged(ppo_trainer, tokenizer, path, card):
    """PATH: LoRA adapters folded into the base weights, loadable by AutoModelForCausalLM alone."""
    merged = ppo_trainer.accelerator.unwrap_model(ppo_trainer.model).pretrained_model.merge_and_unload()
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(card)
    fsync_tree(tmp)
    replace_folder(tmp, path)


def push_to_hub(folder, repo_id):
    """Upload model, tokenizer and card; training state (optimizer, RNG) stays local."""
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, exist_ok=True)
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=folder,
                                  commit_message="Upload model detoxified with PPO",
                                  ignore_patterns=["optimizer*.pt", "rng_state_*.pth", "trainer_state.json"])
    print(f"pushed {folder} to {repo_id}")


def checkpoint_steps(output_dir):
    """Steps of the checkpoint-STEP folders in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", name)))


# what a run writes in its output folder (README "What a run writes"); --overwrite-output-dir removes it first
RUN_FILES = ("final", "final-merged", "stats.jsonl", "samples.jsonl", "training_args.json", "heldout_prompts.jsonl",
             "training_curves.png", "logs")


def remove_run(output_dir):
    """Remove an earlier run from output_dir (its checkpoints first, so a crash in between never leaves a folder
    that resumes from them); other files stay. Returns the names removed."""
    names = [f"checkpoint-{step}" for step in checkpoint_steps(output_dir)]
    names += [name for name in RUN_FILES if os.path.lexists(os.path.join(output_dir, name))]
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return names


def prune_checkpoints(output_dir, keep):
    """Keep the newest `keep` checkpoint-STEP folders (final/ is never pruned)."""
    for step in checkpoint_steps(output_dir)[:-keep]:
        shutil.rmtree(os.path.join(output_dir, f"checkpoint-{step}"), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- find and load
def find_checkpoint(resume_from, output_dir, use_peft, data_order, value_head_width, clearing_output_dir=False):
    """The ResumePoint that `resume_from` names ('auto': the newest checkpoint-STEP in output_dir, None if there is
    none), checked whole and made with the same `data_order` values (a dict of the options that decide the batches)
    and a value head of `value_head_width` inputs (the policy's hidden size, None: unknown). A checkpoint of another
    folder seeds only an empty output_dir, or one about to be cleared (--overwrite-output-dir)."""
    path = resume_from
    if path == "auto":
        if os.path.isdir(os.path.join(output_dir, "final")):
            fail(f"{output_dir} already holds a finished run (final/); to train it further pass "
                 f"--resume-from-checkpoint {os.path.join(output_dir, 'final')} with a larger --steps, or pick another "
                 "--output-dir")
        steps = checkpoint_steps(output_dir)
        if not steps:  # nothing to resume: a pre-empted job can rerun one command from the start
            return None
        path = os.path.join(output_dir, f"checkpoint-{steps[-1]}")
    if not os.path.isdir(path):
        fail(f"--resume-from-checkpoint {path}: no such folder")
    own = in_folder(path, output_dir)
    leftover = [n for n in os.listdir(output_dir) if n != ".detox.lock" and not (clearing_output_dir and (
        n in RUN_FILES or re.fullmatch(r"checkpoint-\d+", n)))]
    if not own and leftover:  # runs are never mixed
        fail(f"--resume-from-checkpoint {path} is not in --output-dir {output_dir}, which holds other files; a "
             "checkpoint of another folder starts a run only in an empty or new --output-dir")
    if own and os.path.basename(os.path.normpath(path)) != "final" and os.path.isdir(os.path.join(output_dir, "final")):
        fail(f"{output_dir} holds a finished run (final/): resuming from {path} would replace it; resume into an "
             "empty or new --output-dir instead")
    required = [LORA_FILES.get(n, n) for n in CHECKPOINT_FILES] if use_peft else CHECKPOINT_FILES
    missing = [name for name in required if not os.path.isfile(os.path.join(path, name))]
    if missing:
        fail(f"checkpoint {path} is incomplete: missing {', '.join(missing)}; resume from an earlier checkpoint")
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        with open(os.path.join(path, "training_args.json")) as f:
            saved_args = json.load(f)
        problem = trainer_state_problem(state)
        if problem is None:
            parts = (optimizer_files(state["engine"], state["num_processes"]) +
                     [f"rng_state_{i}.pth" for i in range(state["num_processes"])])
            missing = [name for name in parts if not os.path.isfile(os.path.join(path, name))]
            if missing:  # SystemExit passes the except below
                fail(f"checkpoint {path} is incomplete: missing {', '.join(missing)}; resume from an earlier "
                     "checkpoint")
            for name in parts:
                if problem is None and not zipfile.is_zipfile(os.path.join(path, name)):  # torch.save writes a zip
                    problem = f"{name} is not a file torch.save wrote (cut short?)"
        if problem is None:
            from safetensors import safe_open

            weights = LORA_FILES["model.safetensors"] if use_peft else "model.safetensors"
            for name in (weights, "value_head.safetensors"):
                with safe_open(os.path.join(path, name), "pt") as f:  # a truncated file fails here
                    shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
            if value_head_width and shapes.get("summary.weight", [1, value_head_width]) != [1, value_head_width]:
                problem = (f"its value head takes {shapes['summary.weight'][1]} inputs, the policy gives "
                           f"{value_head_width}: it is not a checkpoint of this --model")
    except Exception as e:
        problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if problem:
        fail(f"checkpoint {path} is corrupt ({problem}); resume from an earlier checkpoint")
    changed = [k for k, v in data_order.items() if saved_args.get(k) != v]
    if changed:
        fail(f"checkpoint {path} was trained with other {', '.join('--' + k.replace('_', '-') for k in changed)} "
             f"({', '.join(f'{k}={saved_args.get(k)!r}' for k in changed)}); resume with the same values")
    return ResumePoint(path, state["step"], state["kl_coef"], state["num_processes"], state["engine"])


def in_folder(checkpoint, output_dir):
    """Whether a checkpoint folder is one of output_dir's own."""
    return os.path.realpath(os.path.dirname(os.path.normpath(checkpoint))) == os.path.realpath(output_dir)


def trainer_state_problem(state):
    """What is wrong with a trainer_state.json's content, or None."""
    if not isinstance(state, dict):
        return "trainer_state.json is not a JSON object"
    state.setdefault("engine", "ddp")  # checkpoints from before DeepSpeed ran
    kinds = {"step": int, "kl_coef": (int, float), "num_processes": int, "engine": str}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"trainer_state.json has no valid {key!r} ({state.get(key)!r})"
    if state["step"] < 0 or state["num_processes"] < 1 or not (math.isfinite(state["kl_coef"]) and
                                                               state["kl_coef"] >= 0):
        return f"trainer_state.json holds impossible values ({state})"
    return None


def load_checkpoint(ppo_trainer, resume, learning_rate):
    """Restore weights (or adapters), value head, optimizer, KL coefficient, trl's step and this process's RNG. The
    optimizer then runs at `learning_rate` (a resume may change --learning-rate); returns the one it was saved with."""
    from safetensors.torch import load_file

    accelerator = ppo_trainer.accelerator
    # "cpu:0", which accelerate gives each process on CPU, is a device name neither safetensors nor torch.load takes
    device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
    model = accelerator.unwrap_model(ppo_trainer.model)
    try:
        if os.path.isfile(os.path.join(resume.path, LORA_FILES["model.safetensors"])):
            from peft import set_peft_model_state_dict

            adapters = load_file(os.path.join(resume.path, LORA_FILES["model.safetensors"]), device=device)
            set_peft_model_state_dict(model.pretrained_model, adapters)
        else:
            weights = load_file(os.path.join(resume.path, "model.safetensors"), device=device)
            current = model.pretrained_model.state_dict()
            loaded = {current[k].data_ptr() for k in weights if k in current}
            missing = [k for k in current if k not in weights and current[k].data_ptr() not in loaded]  # tied: loaded
            unexpected = [k for k in weights if k not in current]
            if missing or unexpected:
                fail(f"checkpoint {resume.path} does not fit --model {model.config._name_or_path}: missing "
                     f"{missing[:3]}, unexpected {unexpected[:3]}")
            if scale_out.zero_stage(accelerator) == 3:
                scale_out.load_whole_weights(model.pretrained_model, weights)
            else:
                model.pretrained_model.load_state_dict(weights, strict=False)
        value_head = load_file(os.path.join(resume.path, "value_head.safetensors"), device=device)
        if scale_out.zero_stage(accelerator) == 3:
            scale_out.load_whole_weights(model.v_head, value_head)
        else:
            model.v_head.load_state_dict(value_head)
        files = optimizer_files(resume.engine, resume.num_processes)
        if len(files) == 1:
            ppo_trainer.optimizer.load_state_dict(torch.load(os.path.join(resume.path, files[0]),
                                                             map_location=device, weights_only=False))
        else:  # DeepSpeed's ZeRO optimizer takes every rank's partition by rank, and reads its own
            partitions = [None] * resume.num_processes
            partitions[accelerator.process_index] = torch.load(
                os.path.join(resume.path, files[accelerator.process_index]), map_location=device, weights_only=False)
            ppo_trainer.model.optimizer.load_state_dict(partitions, load_from_fp32_weights=True)
        rng_file = os.path.join(resume.path, f"rng_state_{accelerator.process_index}.pth")
        set_rng_state(torch.load(rng_file, weights_only=False))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        fail(f"checkpoint {resume.path} cannot be loaded ({type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}); resume from an earlier checkpoint")
    saved_learning_rate = ppo_trainer.optimizer.param_groups[0]["lr"]
    for group in ppo_trainer.optimizer.param_groups:
        group["lr"] = learning_rate
    ppo_trainer.kl_ctl.value = resume.kl_coef
    ppo_trainer.current_step = resume.step  # trl logs to trackers at this step
    return saved_learning_rate


# ---------------------------------------------------------------------------------------------- signals and logs
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

    def message(self, step, total_steps, path, argv):
        """The line a stopped run exits with: which signal, where it stopped, and the command that resumes."""
        name = signal.Signals(self.signal).name if self.signal else "a signal on another process"
        command = " ".join(["python", *sys.argv]) if argv is None else "the same command"
        return (f"interrupted by {name} at step {step}/{total_steps}; saved {path}; resume with: {command} "
                f"--resume-from-checkpoint {path}")

    def agreed(self, accelerator):
        """True on every process once any process was signalled (so all ranks stop at the same step)."""
        flag = torch.tensor([float(self.signal is not None)], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item())


class RunLog:
    """stats.jsonl (every step's scalars; with --eval-every first a step-0 line of the evaluation before training)
    and samples.jsonl (every episode), on the main process only. A resumed run first cuts them back to its
    checkpoint's step (cut_log), so they match an uninterrupted run."""

    NAMES = ("stats", "samples")

    def __init__(self, output_dir, resume_step, enabled):
        self.files = {}
        self.kept_stats = []  # the stats lines a resumed run keeps (running totals start from them)
        if not enabled:
            return
        for name in self.NAMES:
            path = os.path.join(output_dir, f"{name}.jsonl")
            if resume_step is not None and os.path.exists(path):
                records = cut_log(path, resume_step, keep_records=name == "stats")
                if name == "stats":
                    self.kept_stats = records
            self.files[name] = open(path, "a" if resume_step is not None else "w")

    def write(self, step, scalars, episodes):
        if not self.files:
            return
        try:
            self.files["stats"].write(json.dumps({"step": step, **scalars}) + "\n")
            self.files["samples"].writelines(json.dumps(e) + "\n" for e in episodes)
            for f in self.files.values():
                f.flush()
        except OSError as e:
            fail(f"cannot write the logs of step {step} ({e.strerror}); the checkpoints saved before are intact: free "
                 "some space, then run the same command with --resume-from-checkpoint auto")

    def close(self):
        for f in self.files.values():
            try:
                f.close()
            except OSError:  # a full disk was already reported by write()
                pass


def cut_log(path, resume_step, keep_records):
    """Cut a stats/samples log back to resume_step: the kept lines go to PATH.tmp, fsynced, renamed over PATH (a kill
    leaves the old file whole). A last line cut short (a kill while it was written) is past the checkpoint, whose
    step's lines were flushed before it was saved, and is dropped; any other bad line is an error naming the line.
    Returns the kept lines' records when keep_records, else []."""
    records, tmp = [], f"{path}.tmp"
    try:
        with open(path) as f, open(tmp, "w") as out:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    step = record["step"]
                    if not isinstance(step, int):
                        raise TypeError(step)
                except (ValueError, KeyError, TypeError):
                    if not line.endswith("\n"):  # only the last line can lack its newline
                        break
                    fail(f"{path} line {number} is not a log line of detoxify_ppo.py; move the file away (the run then "
                         "logs from the checkpoint on) or resume from another checkpoint")
                if step <= resume_step:
                    out.write(line)
                    if keep_records:
                        records.append(record)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        fsync_folder(os.path.dirname(path) or ".")
    except OSError as e:
        fail(f"cannot cut {path} back to step {resume_step} ({e.strerror}); it is unchanged: free some space, then "
             "run again")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return records


# ---------------------------------------------------------------------------------------------- model card
def heldout_curve_section(args, heldout_curve):
    """The card's section on the held-out toxicity during training: a table of (step, eval/toxicity) pairs."""
    rows = "\n".join(f"| {step} | {toxicity:.4f} |" for step, toxicity in heldout_curve)
    return f"""
## Held-out toxicity during training

Mean toxicity (the reward classifier's probability of its classes other than `{args.reward_label[0]}`) of the \
policy's responses to a fixed, seeded sample of the held-out prompts (`--eval-prompts` {args.eval_prompts}, at most \
those held out; {args.eval_samples_per_prompt} sampled response(s) each, up to {args.max_new_tokens} tokens), \
measured every {args.eval_every} steps (`eval/toxicity` in stats.jsonl; training_curves.png plots it):

| step | held-out toxicity |
|---|---|
{rows}
"""


def model_card(args, num_shared_layers, step, summary, heldout_curve=None):
    """README.md of a checkpoint: how it was made (args: detoxify_ppo.Args), the last training numbers and, when
    evaluations ran during training, heldout_curve: (step, held-out toxicity) pairs."""
    summary = summary or {}
    reward = f"{summary['reward']:.4f}" if "reward" in summary else "n/a"
    kl = f"{summary['kl']:.4f}" if "kl" in summary else "n/a"
    base = args.model
    if args.use_peft:
        method = (f"LoRA adapters (r={args.lora_r}, alpha={args.lora_alpha}, dropout={args.lora_dropout}) and a value "
                  "head; the reference is the base model with adapters disabled")
    else:
        method = (f"full fine-tuning in {args.dtype} with a float32 value head; the reference shares (stores once) "
                  f"the policy's embeddings and first {num_shared_layers} blocks")
    kl_control = f"adaptive, target {args.target_kl}" if args.adap_kl_ctrl else "fixed"
    curve = heldout_curve_section(args, heldout_curve) if heldout_curve else ""
    reward_text = " + ".join(f"{weight:g} x raw logit of `{label}` from `{classifier}`" for classifier, label, weight in
                             reward_terms(args.reward_model, args.reward_label, args.reward_weight))
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
| prompts | `{args.dataset}` (split {args.dataset_split}), rows with prompt.toxicity > {args.toxicity_threshold}; \
{args.test_fraction:.0%} held out (seed {args.seed}) |
| queries / responses | {args.min_context_tokens}-{args.max_context_tokens} context tokens / \
{args.min_new_tokens}-{args.max_new_tokens} sampled tokens (top_k 0, top_p 1.0) |
| reward | {reward_text}, on the response text only |
| method | {method} |
| PPO | learning rate {args.learning_rate}, batch {args.batch_size}, mini-batch {args.mini_batch_size}, gradient \
accumulation {args.gradient_accumulation_steps}, {args.ppo_epochs} PPO epochs, initial KL coefficient \
{args.init_kl_coef} ({kl_control}) |
| steps | {step} |
| last step | mean reward {reward}, KL {kl} |

The reward classifier is also the default scorer of `evaluate_toxicity.py`: judge the model with an
independent classifier too (`--extra-toxicity-model`), and watch diversity and perplexity.
{curve}
## Evaluation

{CARD_RESULTS_START}
Not evaluated yet: `python evaluate_toxicity.py --models {base} THIS_FOLDER --update-model-card`
{CARD_RESULTS_END}
"""
