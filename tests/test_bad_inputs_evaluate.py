"""Every bad input evaluate_toxicity.py refuses, through the real CLI: non-zero exit, one `error:` line, no
traceback, refused in seconds, and an earlier evaluation's files in the output folder left exactly as they were.
Also the output folder's lock, for real: a second evaluation into a folder in use is refused at once, and the lock
file of an evaluation killed with kill -9 blocks nobody."""

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, record_case, refusal, refused_cli, run_cases, run_cli, timed_cli, tree_digest
from detox_common import OutputLock
from test_bad_inputs import text_file

SAMPLE_WIKI = os.path.join(ROOT, "data", "wiki_toxic_sample.csv")
SAMPLE_ROW_7_ID = "0000000000000006"  # row 7 of the sample (its 8th line) is a toxic one


def base_argv(policy, classifier, output_dir):
    """The arguments every case starts from (each case adds its own; a repeated option: the last one wins)."""
    return ["--models", policy, "--dataset", SAMPLE_WIKI, "--toxicity-model", classifier, "--num-samples", "4",
            "--output-dir", output_dir]


def results_digest(folder):
    """tree_digest of an output folder, less its lock file: every run that takes the folder writes its own name
    there, also one refused afterwards (by then it holds the folder), and the lock file is no result."""
    return {path: digest for path, digest in tree_digest(folder).items() if path != OutputLock.FILE}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The cases' folder: earlier results, and the bad files the cases make."""
    return tmp_path_factory.mktemp("evaluate-cases")


@pytest.fixture(scope="module")
def previous_results(work):
    """An earlier evaluation's files, written by hand: the rows record none of the settings."""
    out = work / "results"
    out.mkdir()
    (out / "toxicity.csv").write_text("model,parameters,n,mean_toxicity,std_toxicity,table_version\n"
                                      "earlier-model,50752,4,0.25,0.1,2\n")
    (out / "toxicity.md").write_text("| model | n |\n|---|---|\n| earlier-model | 4 |\n")
    (out / "generations.jsonl").write_text(json.dumps({"model": "earlier-model", "prompt_index": 0, "id": "1",
                                                       "sample": 0, "generation": "x", "toxicity": 0.25}) + "\n")
    return out


@contextlib.contextmanager
def evaluation_in_background(argv, log_path):
    """evaluate_toxicity.py in a subprocess, as a user starts it (its output to log_path); killed on the way out
    if it still runs (a failed test leaves nothing running)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "evaluate_toxicity.py"), *map(str, argv)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.wait()


def wait_for_lock(folder, process, log_path, timeout=120):
    """Until the process holds the folder's lock (the lock file names its pid: written once the flock is held)."""
    lock = os.path.join(folder, OutputLock.FILE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(lock) and f"pid {process.pid} " in open(lock).read():
            return
        if process.poll() is not None:
            pytest.fail(f"the evaluation ended (exit {process.returncode}) before holding {lock}: "
                        f"{open(log_path).read()[-2000:]}")
        time.sleep(0.1)
    pytest.fail(f"the evaluation did not take {lock} within {timeout} s")


def read_table(folder):
    with open(os.path.join(folder, "toxicity.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(work, tiny_policy, tiny_classifier):
    """A real evaluation with the cases' base arguments in WORK/evaluated, the earlier rows of the settings cases.
    Before it, an evaluation into the same folder was killed with kill -9 while it held the lock: its lock file,
    left behind naming the dead process, must not block this one."""
    out = work / "evaluated"
    argv = base_argv(tiny_policy, tiny_classifier, out)
    with evaluation_in_background(argv, work / "killed.log") as killed:
        wait_for_lock(out, killed, work / "killed.log")
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    left_behind = (out / OutputLock.FILE).read_text()
    result = run_cli("evaluate_toxicity.py", *argv)
    return {"folder": out, "killed": killed, "left_behind": left_behind, "result": result}


def test_lock_of_an_evaluation_killed_with_kill_9_blocks_nobody(evaluated, tiny_policy):
    assert evaluated["killed"].returncode == -signal.SIGKILL
    assert f"evaluation (pid {evaluated['killed'].pid} " in evaluated["left_behind"]  # the dead holder's lock file
    result = evaluated["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["model"] for row in read_table(evaluated["folder"])] == [tiny_policy]


def test_second_evaluation_into_a_folder_in_use_is_refused_at_once(work, tiny_policy, tiny_classifier):
    out = work / "in-use"
    other_model = str(shutil.copytree(tiny_policy, work / "policy-copy", dirs_exist_ok=True))
    first_argv = base_argv(tiny_policy, tiny_classifier, out) + ["--models", tiny_policy, other_model]
    with evaluation_in_background(first_argv, work / "first.log") as first:
        wait_for_lock(out, first, work / "first.log")
        os.kill(first.pid, signal.SIGSTOP)  # it keeps the lock, and cannot finish while the second one tries
        try:
            before = results_digest(out)
            second_argv = base_argv(tiny_policy, tiny_classifier, out)
            holder = f"--output-dir {out} is in use by evaluation (pid {first.pid} "
            line, seconds, returncode = refused_cli("evaluate_toxicity.py", *second_argv, expect=holder)
            intact = results_digest(out) == before
        finally:
            os.kill(first.pid, signal.SIGCONT)
        record_case("second evaluation into a folder in use", "evaluate_toxicity.py", returncode, seconds, line, intact)
        assert intact and "wait for it to end, or pick another folder" in line
        assert first.wait(timeout=600) == 0, open(work / "first.log").read()[-3000:]
    assert [row["model"] for row in read_table(out)] == [tiny_policy, other_model]  # the first one's results, whole
    with open(out / "generations.jsonl") as f:
        assert len([json.loads(line) for line in f]) == 2 * 4


def sample_with(folder, name, row, column, value):
    """A copy of the sample data with one cell changed (row 1: the first line after the header)."""
    with open(SAMPLE_WIKI, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[row - 1][column] = value
    path = os.path.join(folder, name)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "comment_text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def edited_copy(folder, name, edit, file="toxicity.csv"):
    """A copy of the real evaluation's folder (WORK/evaluated) whose file went through edit (text -> text), as a
    hand in an editor would; returns the copy."""
    copy = os.path.join(folder, name)
    if not os.path.exists(copy):
        shutil.copytree(os.path.join(folder, "evaluated"), copy)
        path = os.path.join(copy, file)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(edit(text))
    return copy


def set_cell(column, value):
    def edit(text):
        header, first, *rest = text.splitlines()
        cells = first.split(",")  # the tiny evaluation's cells hold no commas
        cells[header.split(",").index(column)] = value
        return "\n".join([header, ",".join(cells), *rest]) + "\n"
    return edit


def drop_column(column):
    def edit(text):
        lines = [line.split(",") for line in text.splitlines()]
        at = lines[0].index(column)
        return "".join(",".join(cells[:at] + cells[at + 1:]) + "\n" for cells in lines)
    return edit


def module_copy(folder):
    """The toxicity measurement in another folder: the same code, another --toxicity-module."""
    copy = os.path.join(folder, "other-module", "toxicity")
    if not os.path.exists(copy):
        shutil.copytree(os.path.join(ROOT, "measurements", "toxicity"), copy)
    return copy


def trained_on(folder, policy, classifier):
    """A copy of the policy whose training_args.json says it was trained with the classifier as reward."""
    model = os.path.join(folder, "trained-on-classifier")
    if not os.path.exists(model):
        shutil.copytree(policy, model)
        with open(os.path.join(model, "training_args.json"), "w") as f:
            json.dump({"reward_model": [classifier]}, f)
    return model


# name: (extra arguments given the work folder w, the tiny policy p and classifier c; a piece of the message, or
# a function of w, p, c giving it).
# Cases with --output-dir {w}/evaluated... meet the rows of a real evaluation made with base_argv.
EVAL_CASES = {
    "missing model": (lambda w, p, c: ["--models", p, f"{w}/no-such-model"], "not found: no such folder"),
    "unknown hub model": (lambda w, p, c: ["--models", "nobody-x/no-such-model"],
                          "could not load model nobody-x/no-such-model"),
    "missing dataset": (lambda w, p, c: ["--dataset", f"{w}/no-such.csv"], "dataset"),
    "no comment_text": (lambda w, p, c: ["--dataset", text_file(w, "t.csv", "id,text,label\n1,a b,1\n")],
                        "need comment_text and label"),
    "too few toxic rows": (lambda w, p, c: ["--num-samples", "1000"], "fewer than --num-samples 1000"),
    "unknown toxic label": (lambda w, p, c: ["--toxic-label", "toxic"], "has no label 'toxic'"),
    "unknown extra label": (lambda w, p, c: ["--extra-toxicity-model", c], "has no label 'toxic'"),
    "num samples 0": (lambda w, p, c: ["--num-samples", "0"], "--num-samples must be at least 1"),
    "context too short": (lambda w, p, c: ["--max-new-tokens", "128"], "too few for --max-new-tokens 128"),
    "missing toxicity module": (lambda w, p, c: ["--toxicity-module", f"{w}/no-module"], "toxicity module"),
    "classifier as a model": (lambda w, p, c: ["--models", c],
                              "is a RobertaForSequenceClassification, not a causal LM"),
    "causal LM as the scorer": (lambda w, p, c: ["--toxicity-model", p], "is a GPTNeoForCausalLM, not a sequence"),
    "extra scorer the model was trained on": (
        lambda w, p, c: ["--models", trained_on(w, p, c), "--extra-toxicity-model", c, "--extra-toxic-label", "hate"],
        "is a reward classifier"),
    "earlier rows of unknown settings": (lambda w, p, c: [],
                                         "measured with other settings (--dataset: no record of it"),
    # the same model twice, a revision for a local file
    "model listed twice": (lambda w, p, c: ["--models", p, p],
                           lambda w, p, c: f"--models lists {p} 2 times; give each model once"),
    "dataset revision of a local file": (lambda w, p, c: ["--dataset-revision", "main"],
                                         "--dataset-revision main is for a hub dataset"),
    # output folders
    "output dir is a file": (lambda w, p, c: ["--output-dir", text_file(w, "a-file", "x")],
                             "is a file; give a folder (it is made if missing)"),
    "output dir inside a file": (lambda w, p, c: ["--output-dir", f"{text_file(w, 'file-on-the-way', 'x')}/sub"],
                                 "file-on-the-way is a file; pick another folder"),
    # earlier rows made with other settings that change the numbers
    "earlier rows without a fluency model": (lambda w, p, c: ["--output-dir", f"{w}/evaluated", "--fluency-model", p],
                                             lambda w, p, c: f"(--fluency-model: none, now {p})"),
    "earlier rows without an extra scorer": (
        lambda w, p, c: ["--output-dir", f"{w}/evaluated", "--extra-toxicity-model", c, "--extra-toxic-label", "hate"],
        lambda w, p, c: f"(--extra-toxicity-model: none, now {c})"),
    "earlier rows of another dtype": (lambda w, p, c: ["--output-dir", f"{w}/evaluated", "--dtype", "bfloat16"],
                                      "(--dtype: float32, now bfloat16)"),
    "earlier rows of another batch size": (lambda w, p, c: ["--output-dir", f"{w}/evaluated", "--batch-size", "8"],
                                           "(--batch-size: 32, now 8)"),
    "earlier rows of another score batch size": (
        lambda w, p, c: ["--output-dir", f"{w}/evaluated", "--score-batch-size", "16"],
        "(--score-batch-size: 64, now 16)"),
    "earlier rows of another toxicity module": (
        lambda w, p, c: ["--output-dir", f"{w}/evaluated", "--toxicity-module", module_copy(w)],
        f"(--toxicity-module: {os.path.join(ROOT, 'measurements', 'toxicity')}, now "),
    # earlier files edited by hand
    "earlier table with text in a number column": (
        lambda w, p, c: ["--output-dir", edited_copy(w, "text-cell", set_cell("mean_toxicity", "low"))],
        lambda w, p, c: f"toxicity.csv row 1 ({p}): mean_toxicity holds 'low', not a number; restore it, or move"),
    "earlier table without a column": (
        lambda w, p, c: ["--output-dir", edited_copy(w, "no-column", drop_column("mean_toxicity"))],
        "toxicity.csv has no 'mean_toxicity' column; restore it"),
    "earlier table with a model twice": (
        lambda w, p, c: ["--output-dir", edited_copy(w, "twice", lambda text: text + text.splitlines()[1] + "\n")],
        lambda w, p, c: f"toxicity.csv holds {p} twice (rows 1 and 2); delete one of the two lines"),
    "earlier table empty": (lambda w, p, c: ["--output-dir", edited_copy(w, "empty-table", lambda text: "")],
                            "toxicity.csv is empty; restore it"),
    "earlier generations with a broken line": (
        lambda w, p, c: ["--output-dir", edited_copy(w, "broken-jsonl", lambda text: text + '{"model": \n',
                                                     file="generations.jsonl")],
        "generations.jsonl line 5 is not JSON"),
    # dataset content (the file-level ones: detox_common.load_rows; the wiki_toxic rows: choose_prompts)
    "empty dataset file": (lambda w, p, c: ["--dataset", text_file(w, "empty.csv", "")], "empty.csv is empty"),
    "dataset of only a header": (lambda w, p, c: ["--dataset", text_file(w, "header.csv", "id,comment_text,label\n")],
                                 "header.csv"),
    "malformed dataset line": (
        lambda w, p, c: ["--dataset", text_file(w, "malformed.csv", "id,comment_text,label\n1,a b,1\n2,c, d,1\n")],
        "malformed.csv (ParserError: Error tokenizing data. C error: Expected 3 fields in line 3, saw 4)"),
    "dataset label that is a word": (lambda w, p, c: ["--dataset", sample_with(w, "yes.csv", 7, "label", "yes")],
                                     f"yes.csv row 7 (id '{SAMPLE_ROW_7_ID}'): label 'yes' is not 0 or 1"),
    "dataset label empty": (lambda w, p, c: ["--dataset", sample_with(w, "no-label.csv", 7, "label", "")],
                            f"no-label.csv row 7 (id '{SAMPLE_ROW_7_ID}'): label is empty"),
    "toxic dataset row without text": (
        lambda w, p, c: ["--dataset", sample_with(w, "no-text.csv", 7, "comment_text", "")],
        f"no-text.csv row 7 (id '{SAMPLE_ROW_7_ID}'): comment_text is empty"),
}


def last_output_dir(argv):
    """The --output-dir a run writes to: the last one given."""
    return argv[len(argv) - 1 - argv[::-1].index("--output-dir") + 1]


@pytest.fixture(scope="module")
def refused(work, previous_results, evaluated, tiny_policy, tiny_classifier):
    """Every case through the CLI, several at a time, each in a folder of its own holding copies of the earlier
    results (`results`, written by hand; `evaluated`, a real evaluation): {case: (CompletedProcess, seconds, message,
    earlier files unchanged, a new output folder left behind)}."""
    def run_case(case):
        w = work / f"case-{list(EVAL_CASES).index(case)}"
        for earlier in (previous_results, evaluated["folder"]):
            shutil.copytree(earlier, w / earlier.name)
        make_args, message = EVAL_CASES[case]
        argv = base_argv(tiny_policy, tiny_classifier, w / previous_results.name)
        argv += make_args(str(w), tiny_policy, tiny_classifier)
        if callable(message):
            message = message(str(w), tiny_policy, tiny_classifier)
        output_dir = str(last_output_dir(argv))
        earlier = [f for f in dict.fromkeys([str(w / previous_results.name), output_dir]) if os.path.isdir(f)]
        before = {folder: results_digest(folder) for folder in earlier}
        new_folder = not os.path.exists(output_dir)
        result, seconds = timed_cli("evaluate_toxicity.py", *argv)
        intact = all(results_digest(folder) == digest for folder, digest in before.items())
        return result, seconds, message, intact, new_folder and os.path.exists(output_dir)

    return run_cases(run_case, EVAL_CASES)


@pytest.mark.parametrize("case", EVAL_CASES, ids=list(EVAL_CASES))
def test_evaluation_refuses_bad_input(case, refused):
    result, seconds, message, intact, left_a_folder = refused[case]
    line = refusal(result, seconds, message)
    record_case(case, "evaluate_toxicity.py", result.returncode, seconds, line, intact)
    assert intact
    assert not left_a_folder, "a refused run left a new folder behind"
