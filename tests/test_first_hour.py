"""A newcomer's first hour: the mistakes of a first run (no hub access, a path that is not there, a busy port)
are refused at once, through the real CLIs, with one `error:` line that names the way out.

The hub is never reached: "unreachable" is HF_ENDPOINT pointing at a local port that is bound but not listening
(a connection there is refused at once), with the proxies of the environment dropped and an empty HF_HOME."""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import REFUSE_WITHIN, ROOT, refusal, run_cases, run_cli

SAMPLE_RTP = os.path.join(ROOT, "data", "real_toxicity_prompts_sample.jsonl")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def test_the_readme_states_the_time_these_tests_allow():
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"(the tests allow {REFUSE_WITHIN} s)" in f.read()


def run_with_env(script, *args, env_changes=None, unset=(), timeout=120):
    """Like conftest's run_cli, in an environment of our own: (CompletedProcess, seconds it took)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    for name in unset:
        env.pop(name, None)
    env.update(env_changes or {})
    started = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                            text=True, timeout=timeout, env=env, cwd=ROOT)
    return result, time.monotonic() - started


@contextlib.contextmanager
def unreachable_hub(folder):
    """Environment changes that make the hub unreachable without any traffic leaving this machine."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: a connection to it is refused
    try:
        yield {"HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}", "HF_HOME": str(folder / "hf-home"),
               "NO_PROXY": "*"}
    finally:
        closed.close()


HUB_CASES = {  # case: (script, arguments, what the message names)
    "train: hub model": ("detoxify_ppo.py", ["--model", "EleutherAI/gpt-neo-125M"], "model EleutherAI/gpt-neo-125M"),
    "train: hub dataset": ("detoxify_ppo.py", ["--dataset", "allenai/real-toxicity-prompts"],
                           "dataset allenai/real-toxicity-prompts"),
    "evaluate: hub model": ("evaluate_toxicity.py", ["--models", "EleutherAI/gpt-neo-125M"],
                            "model EleutherAI/gpt-neo-125M"),
    "evaluate: hub dataset": ("evaluate_toxicity.py", ["--dataset", "OxAISH-AL-LLM/wiki_toxic"],
                              "dataset OxAISH-AL-LLM/wiki_toxic"),
    "compare: hub model": ("compare_app.py", ["--detoxified", "ybelkada/gpt-neo-125m-detox"],
                           "detoxified model ybelkada/gpt-neo-125m-detox"),
}
MISSING_PATHS = {  # case: (script, option, missing path, what the message names)
    "train: model of a failed run": ("detoxify_ppo.py", "--model", "out/no-such-run/final", "model"),
    "train: reward model folder": ("detoxify_ppo.py", "--reward-model", "./no-such-classifier", "reward model"),
    "evaluate: model of a failed run": ("evaluate_toxicity.py", "--models", "out/no-such-run/final", "model"),
    "evaluate: owner/name whose owner is a local folder": ("evaluate_toxicity.py", "--models", "data/no-such-model",
                                                           "model"),
    "compare: base model": ("compare_app.py", "--base", "out/no-such-run/final", "base model"),
    "compare: detoxified model": ("compare_app.py", "--detoxified", "~/no-such-checkpoint", "detoxified model"),
}
MISSING_DATA = {  # case: (script, option, missing path)
    "train: dataset file": ("detoxify_ppo.py", "--dataset", "data/nope.jsonl"),
    "evaluate: dataset file": ("evaluate_toxicity.py", "--dataset", "nope.csv"),
    "compare: examples file": ("compare_app.py", "--examples", "data/nope.parquet"),
}


def local_argv(script, tiny_policy, tiny_classifier, tmp_path):
    """Arguments that run the script on the tiny local models: each case changes one of them."""
    if script == "detoxify_ppo.py":
        return ["--model", tiny_policy, "--reward-model", tiny_classifier, "--dataset", SAMPLE_RTP, "--steps", "1",
                "--output-dir", tmp_path / "out"]
    if script == "evaluate_toxicity.py":
        return ["--models", tiny_policy, "--toxicity-model", tiny_classifier, "--num-samples", "2",
                "--dataset", os.path.join(ROOT, "data", "wiki_toxic_sample.csv"), "--output-dir", tmp_path / "out"]
    return ["--base", tiny_policy, "--detoxified", tiny_policy, "--toxicity-model", tiny_classifier]


@pytest.fixture(scope="module")
def without_hub(tmp_path_factory, tiny_policy, tiny_classifier):
    """Each case of HUB_CASES, MISSING_PATHS and MISSING_DATA run with the hub unreachable (several at a time, in
    folders of their own): {case: (CompletedProcess, seconds, its folder)}. A path that is not there must be a
    missing path at once: no hub id syntax error, no trip to the hub (even with hub access switched on)."""
    cases = {**{case: (script, args) for case, (script, args, _) in HUB_CASES.items()},
             **{case: (script, [option, path]) for case, (script, option, path, _) in MISSING_PATHS.items()},
             **{case: (script, [option, path]) for case, (script, option, path) in MISSING_DATA.items()}}

    def run_case(case):
        script, args = cases[case]
        folder = tmp_path_factory.mktemp("no-hub")
        with unreachable_hub(folder) as changes:
            result, seconds = run_with_env(script, *local_argv(script, tiny_policy, tiny_classifier, folder), *args,
                                           env_changes=changes, unset=OFFLINE_VARS + PROXY_VARS)
        return result, seconds, folder

    return run_cases(run_case, cases)


@pytest.mark.parametrize("case", HUB_CASES, ids=list(HUB_CASES))
def test_hub_id_with_the_hub_unreachable(case, without_hub):
    """A hub id without hub access: refused in seconds (not after ~30 s of retries), naming both ways out."""
    result, seconds, folder = without_hub[case]
    refusal(result, seconds, "cannot reach the Hugging Face Hub", HUB_CASES[case][2], "HF_HUB_OFFLINE=1",
            "local cache", "is not in it", "pass a local", "python scripts/make_tiny_models.py tiny", 'README "Run"')
    assert not (folder / "out").exists()  # no empty output folder left behind


def test_hub_id_missing_from_the_cache_offline(tmp_path, tiny_classifier):
    """HF_HUB_OFFLINE=1 and an id the (empty) cache lacks: said so, with the ways out."""
    result, seconds = run_with_env("evaluate_toxicity.py", "--models", "EleutherAI/gpt-neo-125M", "--toxicity-model",
                                   tiny_classifier, "--output-dir", tmp_path / "out",
                                   env_changes={"HF_HOME": str(tmp_path / "hf-home")})
    refusal(result, seconds, "could not load model EleutherAI/gpt-neo-125M", "not in the local Hugging Face cache",
            "unset HF_HUB_OFFLINE", "pass a local folder", "make_tiny_models.py tiny")


@pytest.mark.parametrize("case", MISSING_PATHS, ids=list(MISSING_PATHS))
def test_missing_model_path(case, without_hub):
    result, seconds, folder = without_hub[case]
    _, _, path, what = MISSING_PATHS[case]
    line = refusal(result, seconds, f"{what} {path} not found: no such folder")
    assert "Repo id" not in line and "Hugging Face Hub" not in line
    assert not (folder / "out").exists()


@pytest.mark.parametrize("case", MISSING_DATA, ids=list(MISSING_DATA))
def test_missing_dataset_path(case, without_hub):
    result, seconds, folder = without_hub[case]
    refusal(result, seconds, f"dataset {MISSING_DATA[case][2]} not found: no such file or folder")
    assert not (folder / "out").exists()


def test_file_given_for_a_model_folder(tmp_path, tiny_policy, tiny_classifier):
    result, seconds = run_with_env("evaluate_toxicity.py", *local_argv("evaluate_toxicity.py", tiny_policy,
                                   tiny_classifier, tmp_path), "--models", os.path.join(tiny_policy, "config.json"))
    refusal(result, seconds, "is a file; give the folder that holds its config.json")


def test_busy_port(tiny_policy, tiny_classifier, tmp_path):
    """Another server on the port: refused before any weights load, in the app's own terms."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result, seconds = run_with_env("compare_app.py", *local_argv("compare_app.py", tiny_policy, tiny_classifier,
                                       tmp_path), "--port", port)
    refusal(result, seconds, f"--port {port} on 127.0.0.1 is in use; pick another --port (or 0 for the first free one)")
    assert "Loading weights" not in result.stderr and "Running on" not in result.stdout


def test_host_not_of_this_machine(tiny_policy, tiny_classifier, tmp_path):
    """192.0.2.1 (TEST-NET-1, for documentation) is no address of this machine; no name lookup needed to tell."""
    result, seconds = run_with_env("compare_app.py", *local_argv("compare_app.py", tiny_policy, tiny_classifier,
                                   tmp_path), "--host", "192.0.2.1", "--port", "0")
    refusal(result, seconds, "--host 192.0.2.1 is not an address of this machine", "127.0.0.1", "0.0.0.0")
    assert "Loading weights" not in result.stderr


def test_launch_problems_speak_of_the_apps_options():
    """gradio's launch() errors name launch()'s parameters; the app names its own options instead."""
    from types import SimpleNamespace

    import compare_app

    args = SimpleNamespace(host="127.0.0.1", port=7861)
    unreachable = ValueError("When localhost is not accessible, a shareable link must be created. Please set "
                             "share=True or check your proxy settings to allow access to localhost.")
    text = compare_app.launch_problem(unreachable, args)
    assert "--share" in text and "share=True" not in text and "NO_PROXY" in text
    busy = OSError("Cannot find empty port in range: 7861-7861. You can specify a different port by setting the "
                   "GRADIO_SERVER_PORT environment variable or passing the `server_port` parameter to `launch()`.")
    assert compare_app.launch_problem(busy, args).startswith("--port 7861 on 127.0.0.1 is in use")
    assert "--port" in compare_app.launch_problem(busy, SimpleNamespace(host="127.0.0.1", port=0))


def test_app_start_up_lines_name_share_option(tiny_policy, tiny_classifier, tmp_path):
    """The lines the app prints once it serves speak of --share, not of gradio's launch(share=True)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "app.log"
    with open(log, "w") as out:
        app = subprocess.Popen([sys.executable, os.path.join(ROOT, "compare_app.py"), *map(str, local_argv(
            "compare_app.py", tiny_policy, tiny_classifier, tmp_path)), "--port", str(port)], stdout=out,
            stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + 120
            while "To create a public link" not in log.read_text():
                assert app.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        finally:
            app.terminate()
            try:
                app.wait(10)
            except subprocess.TimeoutExpired:
                app.kill()
                app.wait()
    text = log.read_text()
    assert f"Running on local URL:  http://127.0.0.1:{port}" in text, text[-3000:]
    assert "restart with --share" in text and "share=True" not in text, text[-3000:]
    assert not bar_names(text), text[-3000:]  # three models load, and no library bar shows


# ---------------------------------------------------------------- quiet output

BAR = re.compile(r"^(.*?):\s*\d+%\|")  # a tqdm bar line: "DESC:  50%|█████     | 1/2 [...]"


def bar_names(stderr):
    """The descriptions of the progress bars a run drew (tqdm redraws with \\r, so split on it too)."""
    return {m.group(1).strip() for line in re.split(r"[\r\n]", stderr) if (m := BAR.match(line))}


@pytest.mark.parametrize("script, own_bars", [("detoxify_ppo.py", {"PPO"}), ("evaluate_toxicity.py", {"policy"})])
def test_only_the_scripts_own_progress_bars(script, own_bars, tmp_path, tiny_policy, tiny_classifier):
    """A demo run draws its own bar only; --verbose brings back the libraries' (loading weights, saving, datasets),
    which shows that the check sees them."""
    quiet = run_cli(script, *local_argv(script, tiny_policy, tiny_classifier, tmp_path / "quiet"), "--dtype",
                    "float32", timeout=300)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert bar_names(quiet.stderr) == own_bars, quiet.stderr[-3000:]
    loud = run_cli(script, *local_argv(script, tiny_policy, tiny_classifier, tmp_path / "loud"), "--dtype",
                   "float32", "--verbose", timeout=300)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert own_bars < bar_names(loud.stderr) and "Loading weights" in bar_names(loud.stderr), loud.stderr[-3000:]


# ---------------------------------------------------------------- scripts/make_tiny_models.py

def test_tiny_models_are_the_same_bits_whatever_the_thread_count(tmp_path, tiny_policy, tiny_classifier):
    """The README's tiny figures start from these weights: built with one OpenMP thread in a process of its own,
    they equal the fixtures this process built with its own thread count, byte for byte."""
    import torch

    threads = torch.get_num_threads()
    other = "1" if threads != 1 else "2"
    result, _ = run_with_env("scripts/make_tiny_models.py", tmp_path / "tiny", env_changes={"OMP_NUM_THREADS": other},
                             timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for built, fixture in ((tmp_path / "tiny" / "policy", tiny_policy), (tmp_path / "tiny" / "classifier",
                                                                          tiny_classifier)):
        for name in ("model.safetensors", "tokenizer.json"):
            assert (built / name).read_bytes() == open(os.path.join(fixture, name), "rb").read(), \
                f"{name} differs between {threads} and {other} threads"


def test_make_tiny_models_keeps_complete_models(tmp_path, tiny_policy, tiny_classifier):
    """A second run finds both folders complete: one line, nothing rebuilt, no time spent."""
    out = tmp_path / "tiny"
    shutil.copytree(tiny_policy, out / "policy")
    shutil.copytree(tiny_classifier, out / "classifier")
    before = {p: os.path.getmtime(p) for p in map(str, out.rglob("*"))}
    started = time.monotonic()
    result = run_cli("scripts/make_tiny_models.py", out, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == [
        f"{out}/policy and {out}/classifier already built: kept (--force rebuilds them)"], result.stdout
    assert {p: os.path.getmtime(p) for p in map(str, out.rglob("*"))} == before
    assert seconds < 10, f"took {seconds:.1f} s to build nothing"


def test_make_tiny_models_sees_an_incomplete_folder(tmp_path, tiny_policy):
    import make_tiny_models

    folder = tmp_path / "policy"
    shutil.copytree(tiny_policy, folder)
    assert make_tiny_models.is_complete(folder, make_tiny_models.POLICY_FILES)
    os.remove(folder / "model.safetensors")  # e.g. a build stopped half way
    assert not make_tiny_models.is_complete(folder, make_tiny_models.POLICY_FILES)
    assert not make_tiny_models.is_complete(tmp_path / "classifier", make_tiny_models.CLASSIFIER_FILES)


def test_make_tiny_models_help():
    result = run_cli("scripts/make_tiny_models.py", "--help", timeout=60)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    description = lines[lines.index("") + 1]  # the first line after the usage block
    assert description.startswith("Build tiny offline stand-ins"), result.stdout
    assert "(default: 512)" in result.stdout and "(default: 0)" in result.stdout, result.stdout
    assert "--force" in result.stdout


def test_a_bad_argument_is_refused_before_trl_is_imported():
    """What the README says of the refusal time: the arguments are checked before trl's code is imported."""
    code = ("import runpy, sys\nsys.argv = ['detoxify_ppo.py', '--batch-size', '0']\ntry:\n"
            "    runpy.run_path('detoxify_ppo.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print(e)\nprint('trl imported:', 'trl' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "error: --batch-size (0) must be a multiple" in result.stdout, result.stderr[-2000:]
    assert "trl imported: False" in result.stdout
