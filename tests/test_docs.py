"""Every option of every script is documented, with the default the script really has.

Each script's options are read off its own parser; the documentation is the options tables (`| `--option` |
default | what |`) of the file a user is sent to for that script."""

import argparse
import csv
import os
import re

import pytest

from conftest import ROOT

# Documented words for options that have no value by default (None, or an empty list), per option: what "unset"
# means for that option, in the words of its table.
UNSET_WORDS = {
    "--num-shared-layers": "20/28 of the blocks", "--steps": "one pass", "--save-total-limit": "all",
    "--lora-target-modules": "peft's choice", "--threads": "torch's", "--variant": "none",
    ("benchmarks/bench_ppo.py", "--steps"): "3", "--eval-samples": "400 on GPU, 64 on CPU",
    "--variant-steps": "--steps", "--variant-warmup": "--warmup", "--json": "results/bench_ppo_<size>_<device>.json",
}
OPTION_CELL = re.compile(r"`(--[a-z0-9-]+)[^`]*`")


def parsers():
    """(script, parser, the documents its options are in, first match wins)."""
    import bench_ppo
    import compare_app
    import detoxify_ppo
    import evaluate_toxicity
    import make_tiny_models
    from detox_common import cli_parser

    return [
        ("detoxify_ppo.py", detoxify_ppo.build_parser(), ["README.md"]),
        ("evaluate_toxicity.py", cli_parser(evaluate_toxicity.Args, evaluate_toxicity.__doc__),
         ["docs/EVALUATION.md"]),
        ("compare_app.py", cli_parser(compare_app.Args, compare_app.__doc__), ["README.md#compare_app.py"]),
        ("scripts/make_tiny_models.py", make_tiny_models.build_parser(), ["README.md#make_tiny_models.py"]),
        # the benchmark's own options in BENCHMARKS.md; the training options it shares, as in the README
        ("benchmarks/bench_ppo.py", bench_ppo.build_parser(), ["BENCHMARKS.md", "README.md"]),
    ]


def documented_defaults(document):
    """{--option: default cell} from the options tables of a document ("FILE#SECTION": only the table that follows
    a heading naming SECTION)."""
    path, _, section = document.partition("#")
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    if section:
        heading = re.search(rf"^#+ .*{re.escape(section)}.*$", text, re.M)
        assert heading, f"{path} has no section about {section}"
        text = text[heading.end():]
        text = text[:re.search(r"^#+ ", text, re.M).start()] if re.search(r"^#+ ", text, re.M) else text
    defaults = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 3 or not OPTION_CELL.match(cells[0]):
            continue
        options = OPTION_CELL.findall(cells[0])
        separator = " / " if " / " in cells[0] else ", "
        values = cells[1].split(separator) if len(options) > 1 else [cells[1]]
        values = values * len(options) if len(values) == 1 else values  # "off" for all of them
        assert len(values) == len(options), f"{path}: {line}"
        for option, value in zip(options, values):
            defaults.setdefault(option, value.strip().strip("`"))
    return defaults


def same_default(value, text, option, script=""):
    """Whether the documented text states the parser's default value."""
    if value is None or value == []:
        return text == UNSET_WORDS.get((script, option), UNSET_WORDS.get(option, "none"))
    if isinstance(value, bool):
        return text == ("on" if value else "off")
    if isinstance(value, list):
        return text == " ".join(map(str, value))
    if isinstance(value, (int, float)):
        try:
            return float(text.replace(",", "")) == value
        except ValueError:
            return False
    if os.path.isabs(value) and value.startswith(ROOT):  # a file of the project: named relative to it
        return text == os.path.relpath(value, ROOT)
    return text == value


def options_of(parser):
    """(--option, default) of every option a user sees in --help (the --no-FLAG of an on-by-default flag is told
    in its flag's row)."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue  # a positional argument is in the usage line the README shows
        option = action.option_strings[0]
        if option.startswith("--no-") and not action.default:
            continue
        yield option, action.default


@pytest.mark.parametrize("script", [p[0] for p in parsers()])
def test_every_option_is_documented_with_its_default(script):
    _, parser, documents = next(p for p in parsers() if p[0] == script)
    tables = {}
    for document in reversed(documents):  # the first document named wins
        tables.update(documented_defaults(document))
    problems = []
    for option, default in options_of(parser):
        assert option.startswith("--") and "_" not in option, f"{script}: --help shows {option} first"
        if option not in tables:
            problems.append(f"{option} (default {default!r}) is not in {' or '.join(documents)}")
        elif not same_default(default, tables[option], option, script):
            problems.append(f"{option}: the script's default is {default!r}, the documents say {tables[option]!r}")
    assert not problems, f"{script}:\n" + "\n".join(problems)


def test_the_check_sees_a_wrong_default():
    """The comparison is not vacuous: a changed number, flag or path is told apart."""
    assert same_default(2.94e-5, "2.94e-5", "--learning-rate") and not same_default(2.94e-5, "3e-5", "--x")
    assert same_default(True, "on", "--x") and not same_default(False, "on", "--x")
    assert same_default(None, "one pass", "--steps") and not same_default(None, "100", "--steps")
    assert same_default(os.path.join(ROOT, "measurements", "toxicity"), "measurements/toxicity", "--x")
    readme = documented_defaults("README.md")
    assert readme["--learning-rate"] == "2.94e-5" and readme["--max-new-tokens"] == "30"


def readme_commands():
    """Every command line of the README's bash blocks, continuation lines joined."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return {re.sub(r"\s+", " ", line.split("  #")[0]).strip() for line in lines}


def test_the_readme_shows_the_commands_its_figures_come_from():
    """The offline commands the README tells a newcomer to run are the ones reproduce_readme.py times and measures,
    and its screenshot command differs from the user's only in where it writes."""
    import reproduce_readme

    shown = readme_commands()
    for command in reproduce_readme.DEMO_COMMANDS.values():
        assert command in shown, command
    assert reproduce_readme.SCREENSHOT_COMMAND.replace("docs/compare_app.png", "results/compare_app.png") in shown
    assert not any("docs/compare_app.png" in line for line in shown)  # users never overwrite the committed one


def test_reproduce_readme_rewrites_only_its_block(tmp_path):
    import reproduce_readme as r

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert readme.count(r.START) == 1 and readme.count(r.END) == 1
    csv_path = tmp_path / "toxicity.csv"
    base = {"model": "tiny/policy", "n": "240", "mean_toxicity": "0.5", "mean_toxicity_ci_low": "0.45",
            "mean_toxicity_ci_high": "0.55", "distinct_1": "0.7", "perplexity_corpus": "3.0", "empty_generations": "0",
            "bootstrap_samples": "1000"}
    demo = {**base, "model": "out/demo/final", "mean_toxicity": "0.25", "mean_toxicity_ci_low": "0.2",
            "mean_toxicity_ci_high": "0.3", "distinct_1": "0.6", "perplexity_corpus": "12", "empty_generations": "1",
            "diff_mean_toxicity": "-0.25", "diff_mean_toxicity_ci_low": "-0.3", "diff_mean_toxicity_ci_high": "-0.2",
            "p_value": "0.002"}
    columns = sorted({c for c, _, _, _ in r.TABLE_COLUMNS} | set(demo))
    with open(csv_path, "w", newline="") as f:  # the columns the table does not read are 0
        writer = csv.DictWriter(f, columns, restval="0")
        writer.writeheader()
        writer.writerows([base, demo])
    block = r.results_block(r.results_table(csv_path), {"build": 61.4, "train": 9.6}, "a test CPU", "2026-01-02")
    once = r.replace_block(readme, block)
    assert r.replace_block(once, block) == once  # idempotent
    before, after = readme.split(r.START)[0], readme.split(r.END)[1]
    assert once.startswith(before) and once.endswith(after)
    assert "| out/demo/final (20 PPO steps) | 240 | 0.2500 [0.2000, 0.3000] |" in once
    assert "mean toxicity 0.5000 -> 0.2500" in once and "perplexity 3.00 -> 12.00 (4.0x)" in once
    assert "by -0.2500 [-0.3000, -0.2000] (95% bootstrap CI), p = 0.0020 (paired permutation test, 1000 resamples, " \
           "the smallest that many random resamples can give)" in once
    assert "build 1 min 01 s, train 10 s; 1 min 11 s in all" in once
    with pytest.raises(SystemExit):
        r.replace_block(readme.replace(r.END, ""), block)


def test_the_heldout_curve_line_reads_the_demos_evaluations(tmp_path):
    import json

    import reproduce_readme as r

    stats = tmp_path / "stats.jsonl"
    stats.write_text("".join(json.dumps(line) + "\n" for line in [
        {"step": 0, "eval": True, "eval/toxicity": 0.5}, {"step": 1, "objective/kl": 0.1},
        {"step": 5, "objective/kl": 0.2, "eval/toxicity": 0.125}]))
    line = r.heldout_curve(stats)
    assert "by step: 0: 0.500, 5: 0.125 (" in line and f"on {r.EVAL_PROMPTS} held-out prompts" in line
    import detoxify_ppo

    assert r.EVAL_PROMPTS == detoxify_ppo.Args().eval_prompts  # the demo runs with the default


def test_the_readmes_stats_one_liner_prints_step_reward_and_kl(tmp_path):
    """README "Watching a run": the `tail -f stats.jsonl | python -c ...` line, run on a stats.jsonl that starts
    with an --eval-every line (no reward or KL in it)."""
    import json
    import shlex
    import subprocess
    import sys

    line = next(c for c in readme_commands() if c.startswith("tail -f"))
    program = shlex.split(line.split("|", 1)[1])
    assert program[:2] == ["python", "-c"]
    stats = [{"step": 0, "eval": True, "eval/toxicity": 0.5},
             {"step": 1, "env/reward_mean": 1.23456, "objective/kl": 0.0},
             {"step": 2, "env/reward_mean": 2.5, "objective/kl": 0.94321, "eval/toxicity": 0.1}]
    result = subprocess.run([sys.executable, *program[1:]], input="".join(json.dumps(s) + "\n" for s in stats),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1 1.235 0.0", "2 2.5 0.943"]
