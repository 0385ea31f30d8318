import contextlib
import hashlib
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub; set before any Hugging Face import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import make_tiny_models  # noqa: E402  (scripts/ is on pytest's pythonpath, see pyproject.toml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Tests that pin torch to one thread (steadier on a shared CPU) leave the count as they found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus():
    return make_tiny_models.synthetic_corpus(512, seed=0)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, corpus):
    """Folder of a 4-block GPT-Neo pretrained on the synthetic corpus (about half its samples toxic)."""
    path = str(tmp_path_factory.mktemp("models") / "policy")
    make_tiny_models.build_policy(path, [p + c for p, c, _ in corpus])
    return path


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, corpus):
    """Folder of a 2-layer RoBERTa classifier {0: nothate, 1: hate} trained to flag the corpus' insults."""
    path = str(tmp_path_factory.mktemp("models") / "classifier")
    make_tiny_models.build_classifier(path, make_tiny_models.classifier_texts(corpus))
    return path


def run_watched(cmd, env, timeout):
    """subprocess.run(cmd) with its output captured; past `timeout` seconds the test fails with what the processes
    printed and every Python process's stacks (faulthandler on SIGABRT, down the whole tree, torchrun's workers
    included), so a hang says where it hung."""
    import signal

    import psutil

    env = dict(env, PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        for pid in reversed(tree):  # the workers first, one at a time so that their stacks don't interleave
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
            time.sleep(1)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... hung for {timeout} s; its stdout ends:\n{out[-3000:]}\n"
                    f"its stderr, with the stacks, ends:\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


SAMPLE_DATA = os.path.join(ROOT, "data", "real_toxicity_prompts_sample.jsonl")
DDP_LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # on a machine without GPUs: two torchrun workers, made MULTI_CPU by the script
# the 2-process runs: float32, so that engines compare to float rounding; accumulation 2, so that every engine must
# honour it to agree
TWO_PROCESS_PPO = ["--dtype", "float32", "--steps", "2", "--batch-size", "8", "--mini-batch-size", "4",
                   "--gradient-accumulation-steps", "2", "--ppo-epochs", "2"]


def launch_training(launcher_args, tiny_policy, tiny_classifier, out, *args):
    """`accelerate launch LAUNCHER_ARGS detoxify_ppo.py` on the tiny models and the sample prompts, 2 PPO steps
    (TWO_PROCESS_PPO); returns its stdout, after asserting it succeeded."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--main_process_port", "0",
           os.path.join(ROOT, "detoxify_ppo.py"), "--model", tiny_policy, "--reward-model", tiny_classifier,
           "--dataset", SAMPLE_DATA, "--output-dir", str(out), *TWO_PROCESS_PPO, *map(str, args)]
    result = run_watched(cmd, env, timeout=300)  # 20-40 s here
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory, tiny_policy, tiny_classifier):
    """(output folder, stdout) of a 2-process DDP run with a checkpoint at step 1 and held-out evaluations; the
    reference of the multi-process tests (the evaluations change nothing of the training)."""
    out = tmp_path_factory.mktemp("ddp") / "out"
    log = launch_training(DDP_LAUNCH, tiny_policy, tiny_classifier, out, "--save-every", "1", "--eval-every", "1",
                          "--eval-prompts", "8")
    return out, log


def run_cli(script, *args, timeout=600):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return run_watched([sys.executable, os.path.join(ROOT, script), *map(str, args)], env, timeout)


REFUSE_WITHIN = 25  # seconds; the hub's retries alone took 25-29 s, on top of the imports (a few s)


def tree_digest(folder):
    """sha256 of every file under folder, by relative path; not of .detox.lock, which names the last run that held
    the folder, refused ones included, and holds no result."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            if name == ".detox.lock":
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def refusal(result, seconds, *pieces):
    """The one-line error of a refused run, after checking what every refusal must be: a non-zero exit, no traceback,
    exactly one `error:` line, last, holding every piece, within REFUSE_WITHIN seconds. Returns that line."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    for piece in pieces:
        assert piece in errors[0], errors[0]
    assert "Retrying" not in result.stderr, result.stderr[-3000:]
    assert seconds < REFUSE_WITHIN, f"refused after {seconds:.1f} s: {errors[0]}"
    return errors[0]


def refused_cli(script, *args, expect, timeout=120):
    """Run a script as a user would with input it must refuse; (error line, seconds, exit code) after refusal()'s
    checks."""
    result, seconds = timed_cli(script, *args, timeout=timeout)
    line = refusal(result, seconds, expect)
    return line, seconds, result.returncode


def timed_cli(script, *args, timeout=120):
    """run_cli and the seconds it took."""
    started = time.monotonic()
    result = run_cli(script, *args, timeout=timeout)
    return result, time.monotonic() - started


def run_cases(run_case, cases):
    """{case: run_case(case)}, as many cases at a time as there are cores: a refusal is mostly one core's imports,
    so a table of them takes about 1/cores of the time. Each case must work in folders of its own."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(cases, pool.map(run_case, cases)))


def record_case(case, script, returncode, seconds, line, intact):
    """With DETOX_CASE_TABLE=FILE set, one JSON line per refused case: the table of cases in the notes comes from it."""
    if os.environ.get("DETOX_CASE_TABLE"):
        import json

        with open(os.environ["DETOX_CASE_TABLE"], "a") as f:
            f.write(json.dumps({"script": script, "case": case, "exit": returncode, "seconds": round(seconds, 1),
                                "message": line, "earlier_outputs_intact": intact}) + "\n")


def run_with_fault(fault, script, *args, timeout=600):
    """Run a script as a user would, with a fault injected: `fault` is Python source run in the same process just
    before the script, replacing one of the project's functions with one that kills or signals the process at a
    chosen point (the script's own code is unchanged)."""
    argv = [script, *map(str, args)]
    code = f"{fault}\nimport runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path({script!r}, run_name='__main__')\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
