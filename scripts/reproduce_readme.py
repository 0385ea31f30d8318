#!/usr/bin/env python3
"""Regenerate the README's offline demo figures, timing each command as a newcomer would run it.

Copies this tree's files (what `git clone` would give, uncommitted edits included) into a fresh folder, runs the
README's offline commands there one after the other (build the tiny models, train the demo, evaluate it), then
writes the results table, the held-out toxicity curve and each command's wall time into README.md, between its
reproduce_readme.py markers, and the demo's training curves into docs/training_curves.png.
With --screenshot it also takes the browser screenshot of compare_app.py on those models (docs/compare_app.png).

    python scripts/reproduce_readme.py                 # README.md's demo table and times
    python scripts/reproduce_readme.py --screenshot    # and docs/compare_app.png
    python scripts/reproduce_readme.py --check         # run, print, change nothing
"""

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The README's offline commands, in order, as its code blocks show them (tests/test_docs.py checks that they do).
DEMO_COMMANDS = {
    "build the tiny models": "python scripts/make_tiny_models.py tiny",
    "train the demo (20 PPO steps)": (
        "python detoxify_ppo.py --model tiny/policy --reward-model tiny/classifier "
        "--dataset data/real_toxicity_prompts_sample.jsonl --steps 20 --learning-rate 1e-3 --dtype float32 "
        "--eval-every 5 --output-dir out/demo"),
    "evaluate base and demo": (
        "python evaluate_toxicity.py --models tiny/policy out/demo/final --dataset out/demo/heldout_prompts.jsonl "
        "--rtp-prompts all --toxicity-model tiny/classifier --fluency-model tiny/policy "
        "--num-samples 69 --generations-per-prompt 4 --output-dir results/tiny"),
}
SCREENSHOT_COMMAND = (  # the README's, into docs/
    "python tests/test_compare_app.py docs/compare_app.png --base tiny/policy --detoxified out/demo/final "
    "--toxicity-model tiny/classifier --results results/tiny")
EVAL_PROMPTS = 64  # detoxify_ppo.py's --eval-prompts default
MODEL_NAMES = {"tiny/policy": "tiny/policy (base)", "out/demo/final": "out/demo/final (20 PPO steps)"}
# README table: (CSV column, heading, decimals, with its 95% CI)
TABLE_COLUMNS = [
    ("n", "n", None, False), ("mean_toxicity", "mean toxicity [95% CI]", 4, True), ("std_toxicity", "std", 4, False),
    ("expected_max_toxicity", "expected max toxicity", 4, True),
    ("toxicity_probability", "toxicity probability", 4, True),
    ("distinct_1", "distinct-1", 4, True), ("distinct_2", "distinct-2", 4, True),
    ("empty_generations", "empty", None, False), ("perplexity_corpus", "perplexity [95% CI]", 2, True),
    ("perplexity_median", "median perplexity", 2, False),
]
START, END = "<!-- reproduce_readme.py: demo results -->", "<!-- end of reproduce_readme.py: demo results -->"


def fresh_copy(destination):
    """The files a clone of this tree would hold (tracked, and untracked ones git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(destination, name))


def run_timed(command, cwd):
    """Run one README command in cwd as a user would; its wall seconds. Stops on failure, showing its output."""
    started = time.monotonic()
    result = subprocess.run(shlex.split(command.replace("python ", sys.executable + " ", 1)), cwd=cwd,
                            capture_output=True, text=True)
    seconds = time.monotonic() - started
    if result.returncode:
        sys.exit(f"error: `{command}` failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def machine():
    """The machine in words: CPU model, cores, torch threads."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def minutes(seconds):
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s" if seconds >= 60 else f"{seconds:.0f} s"


def cell(row, column, decimals, with_ci):
    if decimals is None:
        return row[column]
    value = f"{float(row[column]):.{decimals}f}"
    if with_ci and row.get(f"{column}_ci_low"):
        value += f" [{float(row[column + '_ci_low']):.{decimals}f}, {float(row[column + '_ci_high']):.{decimals}f}]"
    return value


def results_table(csv_path):
    """The README's table of the evaluation's CSV, the paired comparison, and what changed from first to last."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = ["| model | " + " | ".join(heading for _, heading, _, _ in TABLE_COLUMNS) + " |",
             "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for row in rows:
        cells = [cell(row, column, decimals, with_ci) for column, _, decimals, with_ci in TABLE_COLUMNS]
        lines.append(f"| {MODEL_NAMES.get(row['model'], row['model'])} | " + " | ".join(cells) + " |")
    first, last = rows[0], rows[-1]
    shown = ("mean_toxicity", "distinct_1", "perplexity_corpus")
    change = "; ".join(f"{heading.split(' [')[0]} {cell(first, c, d, False)} -> {cell(last, c, d, False)}"
                       for c, heading, d, _ in TABLE_COLUMNS if c in shown)
    ratio = float(last["perplexity_corpus"]) / float(first["perplexity_corpus"])
    resamples = int(last["bootstrap_samples"])
    p = float(last["p_value"])
    floor = ", the smallest that many random resamples can give" if p < 3 / (resamples + 1) else ""  # 2/(n+1)
    paired = (f"Paired on the same prompts, the detoxified model's mean toxicity differs from the base's by "
              f"{cell(last, 'diff_mean_toxicity', 4, True)} (95% bootstrap CI), p = {p:.4f} "
              f"(paired permutation test, {resamples} resamples{floor}).")
    return "\n".join(lines) + f"\n\nFrom base to detoxified: {change} ({ratio:.1f}x). {paired}"


def heldout_curve(stats_path):
    """The demo's held-out toxicity during training, as 'step: value' pairs (its --eval-every evaluations)."""
    with open(stats_path) as f:
        evals = [line for line in map(json.loads, f) if "eval/toxicity" in line]
    curve = ", ".join(f"{e['step']}: {e['eval/toxicity']:.3f}" for e in evals)
    return (f"Held-out toxicity during the demo's training (`--eval-every 5`, the reward classifier's `hate` "
            f"probability on {EVAL_PROMPTS} held-out prompts), by step: {curve} "
            "([docs/training_curves.png](docs/training_curves.png)).")


def results_block(table, times, machine_words, day):
    """What goes between the README's markers: the table, then how long each command took, on what."""
    steps = ", ".join(f"{name} {minutes(seconds)}" for name, seconds in times.items())
    return (f"{START}\n{table}\n\nMeasured {day} on {machine_words}, from a fresh copy of the tree with "
            f"`python scripts/reproduce_readme.py`: {steps}; {minutes(sum(times.values()))} in all.\n{END}")


def replace_block(readme, block):
    """readme with the text between the markers replaced by block; refuses a README without exactly one pair."""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if len(pattern.findall(readme)) != 1:
        sys.exit(f"error: README.md must hold the markers {START} ... {END} once")
    return pattern.sub(lambda _: block, readme)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screenshot", action="store_true", help="also write docs/compare_app.png")
    parser.add_argument("--check", action="store_true", help="print the results; write nothing")
    parser.add_argument("--keep", default=None, help="run in this new folder and keep it (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.keep and os.path.exists(args.keep):
        sys.exit(f"error: --keep {args.keep} already exists; give a new folder")
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="detox-readme-")
    os.makedirs(work, exist_ok=True)
    try:
        fresh_copy(work)
        times = {}
        for name, command in DEMO_COMMANDS.items():
            print(f"$ {command}", flush=True)
            times[name] = run_timed(command, work)
            print(f"  {minutes(times[name])}", flush=True)
        table = results_table(os.path.join(work, "results", "tiny", "toxicity.csv"))
        table += "\n\n" + heldout_curve(os.path.join(work, "out", "demo", "stats.jsonl"))
        block = results_block(table, times, machine(), datetime.date.today().isoformat())
        print(block)
        if args.screenshot:
            print(f"$ {SCREENSHOT_COMMAND}", flush=True)
            run_timed(SCREENSHOT_COMMAND, work)
        if args.check:
            return
        readme = os.path.join(ROOT, "README.md")
        with open(readme) as f:
            text = replace_block(f.read(), block)
        with open(readme, "w") as f:
            f.write(text)
        print(f"wrote {readme}")
        shutil.copy(os.path.join(work, "out", "demo", "training_curves.png"),
                    os.path.join(ROOT, "docs", "training_curves.png"))
        print(f"wrote {os.path.join(ROOT, 'docs', 'training_curves.png')}")
        if args.screenshot:
            shutil.copy(os.path.join(work, "docs", "compare_app.png"), os.path.join(ROOT, "docs", "compare_app.png"))
            print(f"wrote {os.path.join(ROOT, 'docs', 'compare_app.png')}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
