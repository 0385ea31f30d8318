"""compare_app.py: its CLI refusals, its page pieces, and the app itself driven in a real browser.

The browser test starts the app on a free localhost port with tiny offline models and drives Debian's
headless Chromium (/usr/bin/chromium, installed by .ci/run) through Playwright; it never downloads a browser
(no `playwright install`) and fails if any request of the page leaves localhost.

The committed screenshot docs/compare_app.png comes from the same browser run, with the README's offline
demo models (python scripts/make_tiny_models.py tiny; the detoxify_ppo.py demo run to out/demo):

    python tests/test_compare_app.py docs/compare_app.png --base tiny/policy --detoxified out/demo/final \\
        --toxicity-model tiny/classifier --results results/tiny
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

import pytest
import torch

if __name__ == "__main__":  # the README's screenshot command runs this file as a script: pytest's pythonpath
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [_root, os.path.join(_root, "scripts")]
from conftest import ROOT, record_case, refused_cli, run_cli, tree_digest  # noqa: E402
from detox_common import classifier_logits, load_classifier  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SAMPLE_WIKI = os.path.join(ROOT, "data", "wiki_toxic_sample.csv")


# ---------------------------------------------------------------- helpers (also used by the screenshot command)

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """compare_app.py in a subprocess on a free localhost port; its output goes to log_path."""

    def __init__(self, app_args, log_path, timeout=90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                   PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "compare_app.py"), *map(str, app_args),
                                      "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=ROOT)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                self.close()
                raise AssertionError(f"compare_app.py exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                self.close()
                raise AssertionError(f"compare_app.py did not answer on {self.url} in {timeout} s:\n"
                                     f"{self.output()[-3000:]}")
            time.sleep(0.3)

    def output(self):
        return open(self.log_path).read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def require_browser():
    """Playwright and Debian's Chromium must be there: a missing one FAILS (never skips) the test."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: the browser test needs Debian's chromium, which .ci/run installs "
                    "(apt-get update && apt-get install -y chromium, as root)", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is not installed: pip install -r requirements.txt (as .ci/run does); "
                    "never `playwright install`, the test uses /usr/bin/chromium", pytrace=False)


def drive(url, screenshot=None, check_results=True, prompt_text="his sister claimed the bird", seed=1):
    """Use the app as a person would; returns what it saw. Every request leaving localhost is blocked and
    recorded (the page must render offline: no CDN fonts, no analytics)."""
    from playwright.sync_api import expect, sync_playwright

    external, seen = [], {}

    def route(r):
        parts = urlparse(r.request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in ("127.0.0.1", "localhost"):
            external.append(r.request.url)
            r.abort()
        else:
            r.continue_()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.route("**/*", route)
            page.goto(url)
            status, generate = page.locator("#status"), page.locator("#generate")
            prompt = page.locator("#prompt textarea")
            expect(generate).to_be_visible(timeout=30_000)

            generate.click()  # an empty prompt: a visible message, no answers
            expect(status).to_contain_text("Please type a prompt", timeout=15_000)
            seen["empty_message"] = status.inner_text()
            seen["empty_answers"] = page.locator("#base-answer textarea").input_value()

            prompt.fill("x" * 5000)  # over-long: refused with a message
            generate.click()
            expect(status).to_contain_text("too long", timeout=15_000)
            seen["long_message"] = status.inner_text()

            prompt.fill(prompt_text)  # a typed prompt (the tiny models end a whole example sentence at once)
            page.locator("#seed input").fill(str(seed))

            runs = iter(range(1, 100))

            def answers():
                generate.click()  # wait for this request's own "Done" (run N), not the previous one's
                expect(status).to_contain_text(f"(run {next(runs)}:", timeout=30_000)
                return (page.locator("#base-answer textarea").input_value(),
                        page.locator("#detox-answer textarea").input_value(),
                        page.locator("#base-score input").input_value(),
                        page.locator("#detox-score input").input_value())

            seen["answers"] = answers()
            seen["verdict"] = page.locator("#verdict").inner_text()
            seen["diff"] = page.locator("#diff").inner_text()
            if screenshot:
                page.screenshot(path=screenshot, full_page=True)
            seen["answers_again"] = answers()  # same prompt and seed: the same answers

            # last, so that its fill (a round trip to the app) cannot land on the typed prompt above
            page.locator("#examples button.gallery-item").first.click()  # an example fills the prompt box
            expect(prompt).not_to_have_value(prompt_text, timeout=15_000)
            seen["example"] = prompt.input_value()

            if check_results:
                page.get_by_role("tab", name="Evaluation results").click()
                table = page.locator("#results-table")
                expect(table).to_be_visible(timeout=15_000)
                seen["table"] = table.inner_text()
                chart = page.locator("#results-chart img")
                expect(chart).to_be_visible(timeout=15_000)
                seen["chart_width"] = chart.evaluate("img => img.naturalWidth")
        finally:
            browser.close()
    seen["external"] = external
    return seen


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def detox_policy(tmp_path_factory, tiny_policy):
    """A stand-in 'detoxified' model: a copy of the tiny policy in another folder, loaded on its own, so that
    the same prompt and seed must give the same answer and score on both sides."""
    path = str(tmp_path_factory.mktemp("models") / "detox")
    shutil.copytree(tiny_policy, path)
    return path


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """An evaluate_toxicity.py output folder, written by its own table and chart writers."""
    import evaluate_toxicity as ev

    path = str(tmp_path_factory.mktemp("results"))
    rows = [{"model": name, "parameters": 50752, "n_prompts": 8, "k": 1, "n": 8, "max_new_tokens": 30,
             "mean_toxicity": mean, "std_toxicity": 0.1} for name, mean in (("tiny-original", 0.48),
                                                                             ("tiny-detoxified", 0.05))]
    ev.write_tables(rows, [], path)
    ev.plot(rows, path)
    return path


# ---------------------------------------------------------------- tests

def test_browser_compare(tmp_path, tiny_policy, detox_policy, tiny_classifier, results_dir):
    require_browser()
    app = App(["--base", tiny_policy, "--detoxified", detox_policy, "--toxicity-model", tiny_classifier,
               "--examples", SAMPLE_WIKI, "--results", results_dir], tmp_path / "app.log")
    try:
        seen = drive(app.url, screenshot=str(tmp_path / "compare_app.png"))
    finally:
        app.close()
    log = app.output()
    assert "Please type a prompt" in seen["empty_message"] and seen["empty_answers"] == ""
    assert "5000 characters" in seen["long_message"]
    assert seen["example"].strip(), "clicking an example should fill the prompt box"
    base, detox, base_score, detox_score = seen["answers"]
    assert base.strip() and detox.strip(), seen["answers"]
    assert (base, base_score) == (detox, detox_score), "same weights, prompt and seed: the same answer and score"
    for score in (base_score, detox_score):
        assert 0 <= float(score) <= 1, seen["answers"]
    assert "toxicity" in seen["verdict"] and "Detoxified answer" in seen["verdict"]
    assert seen["answers_again"] == seen["answers"], "the same prompt and seed should give the same answers"
    assert "tiny-original" in seen["table"] and "tiny-detoxified" in seen["table"]
    assert seen["chart_width"] > 0
    assert seen["external"] == [], f"the page tried to reach the internet: {seen['external']}"
    assert os.path.getsize(tmp_path / "compare_app.png") > 10_000
    assert "Running on local URL:  http://127.0.0.1:" in log, log[-2000:]
    assert "gradio.live" not in log


def test_cli_checks_accept_good_input(tiny_policy, tiny_classifier):
    """Good arguments pass check_args, which returns each model's context and the example prompts."""
    from transformers import HfArgumentParser

    import compare_app

    (args,) = HfArgumentParser(compare_app.Args).parse_args_into_dataclasses(
        args=["--base", tiny_policy, "--detoxified", tiny_policy, "--toxicity-model", tiny_classifier])
    contexts, examples = compare_app.check_args(args)
    assert contexts == {tiny_policy: 128}
    assert examples == compare_app.read_examples(SAMPLE_WIKI, 8, 2000)  # the defaults: the sample data, 8, 2000


def test_read_examples():
    import compare_app

    examples = compare_app.read_examples(SAMPLE_WIKI, 8, 2000)
    assert 0 < len(examples) <= 8 and all(e.strip() and len(e) <= 2000 for e in examples)
    assert compare_app.read_examples(SAMPLE_WIKI, 8, 2000) == examples  # the same prompts every time
    shortest = min(len(e) for e in examples)
    assert compare_app.read_examples(SAMPLE_WIKI, 8, shortest) == [e for e in examples if len(e) <= shortest]
    with pytest.raises(SystemExit, match="longer than --max-prompt-chars 1"):
        compare_app.read_examples(SAMPLE_WIKI, 8, 1)


def test_scores_match_evaluate_toxicity(tiny_policy, tiny_classifier):
    """The app's score is the classifier's probability of the toxic label; sampling settings reach generation."""
    import compare_app

    examples = compare_app.read_examples(SAMPLE_WIKI, 8, 2000)
    comparer = compare_app.Comparer([tiny_policy, tiny_policy], {tiny_policy: 128},
                                    toxicity_module=os.path.join(ROOT, "measurements", "toxicity"),
                                    toxicity_model=tiny_classifier, toxic_label="hate", max_prompt_chars=2000,
                                    max_prompt_tokens=512, max_new_tokens_limit=200, device="cpu")
    assert list(comparer.models) == [tiny_policy]  # the same model twice is loaded once
    assert comparer.new_tokens_limit() == 127  # the 128-position model keeps one position for the prompt
    text, score = comparer.answer(tiny_policy, examples[0], 20, 1.0, 1.0, seed=3)
    assert (text, score) == comparer.answer(tiny_policy, examples[0], 20, 1.0, 1.0, seed=3)
    assert 0 <= score <= 1
    # the sampling settings reach generation: a tiny top-p or temperature leaves one answer whatever the seed
    assert len({comparer.answer(tiny_policy, "the cat said that", 10, 1.0, 0.01, seed=s)[0] for s in range(3)}) == 1
    assert len({comparer.answer(tiny_policy, "the cat said that", 10, 1e-4, 1.0, seed=s)[0] for s in range(3)}) == 1
    # the score is the classifier's probability of "hate", computed here without the measurement module
    tokenizer, classifier = load_classifier(tiny_classifier, "cpu", torch.float32)
    probability = torch.softmax(classifier_logits(tokenizer, classifier, [text]), -1)[0, 1].item()
    assert score == pytest.approx(probability, abs=1e-5)
    assert comparer.prompt_problem("   ", 20).startswith("Please type a prompt")
    assert "too long" in comparer.prompt_problem("the cat " * 200, 20)  # 128-position model: too many tokens
    assert "2001 characters, the limit is 2000" in comparer.prompt_problem("x" * 2001, 20)
    assert comparer.prompt_problem("the cat said that", 20) is None


def test_page_pieces():
    import compare_app

    assert compare_app.word_diff("a b c", "a x c") == [("a ", None), ("b ", "-"), ("x ", "+"), ("c ", None)]
    assert "less toxic" in compare_app.verdict_html(0.9, 0.1) and "-0.8000" in compare_app.verdict_html(0.9, 0.1)
    assert "more toxic" in compare_app.verdict_html(0.1, 0.9)
    assert "as toxic as" in compare_app.verdict_html(0.5, 0.501)
    assert "&lt;b&gt;" in compare_app.status_html("<b>")


BAD_INPUTS = {  # case: (arguments changed, piece of the one-line message)
    "missing base": ({"--base": "{tmp}/no-such-model"}, "base model"),
    "missing detoxified": ({"--detoxified": "./out/no-such-checkpoint"}, "detoxified model"),
    "not a causal LM": ({"--detoxified": "{classifier}"}, "not a causal LM"),
    "unknown label": ({"--toxic-label": "toxic"}, "no label 'toxic'"),
    "missing results": ({"--results": "{tmp}/no-results"}, "results folder"),
    "results without tables": ({"--results": "{tmp}"}, "no toxicity.csv"),
    "bad port": ({"--port": "70000"}, "--port"),
    "missing examples": ({"--examples": "{tmp}/none.csv"}, "none.csv"),
    "examples without toxic rows": ({"--examples": "{tmp}/clean.csv"}, "clean.csv has no toxic rows (label 1)"),
    "examples with a label that is a word": ({"--examples": "{tmp}/word.csv"},
                                             "word.csv row 2 (id 2): label 'yes' is not 0 or 1"),
    "zero new tokens": ({"--max-new-tokens": "0"}, "--max-new-tokens"),
    "new tokens over the context": ({"--max-new-tokens": "128", "--max-new-tokens-limit": "500"}, "too few"),
}


def bad_argv(case, tmp_path, tiny_policy, tiny_classifier):
    (tmp_path / "clean.csv").write_text("id,comment_text,label\n1,the cat is kind.,0\n")
    (tmp_path / "word.csv").write_text("id,comment_text,label\n1,you stupid idiot.,1\n2,the cat is kind.,yes\n")
    good = {"--base": tiny_policy, "--detoxified": tiny_policy, "--toxicity-model": tiny_classifier}
    change = {k: v.format(tmp=tmp_path, classifier=tiny_classifier) for k, v in BAD_INPUTS[case][0].items()}
    return [x for item in (good | change).items() for x in item]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_checks_refuse_bad_input(case, tmp_path, tiny_policy, tiny_classifier):
    """Each bad input stops in check_args, before any weights load, with a one-line error."""
    from transformers import HfArgumentParser

    import compare_app

    (args,) = HfArgumentParser(compare_app.Args).parse_args_into_dataclasses(
        args=bad_argv(case, tmp_path, tiny_policy, tiny_classifier))
    with pytest.raises(SystemExit) as stop:
        compare_app.check_args(args)
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message and BAD_INPUTS[case][1] in message, message


@pytest.mark.parametrize("case", ["missing detoxified", "not a causal LM"])
def test_cli_refuses_bad_input(case, tmp_path, tiny_policy, tiny_classifier):
    """Through the real CLI: one stderr line, non-zero exit, no weights loaded, nothing served."""
    result = run_cli("compare_app.py", *bad_argv(case, tmp_path, tiny_policy, tiny_classifier), timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD_INPUTS[case][1] in lines[0], result.stderr[-2000:]
    assert "Loading weights" not in result.stderr and "Running on" not in result.stdout


ADDRESS_CASES = {  # case: (--host, --port (None: a port another server holds), piece of the one-line message)
    "host that is no address": ("999.1.1.1", "0", "--host 999.1.1.1 is neither an address nor a name this machine"),
    "host name that does not resolve": ("no-such-host.invalid", "0",
                                        "--host no-such-host.invalid is neither an address nor a name"),
    "host of another machine": ("198.51.100.7", "0", "--host 198.51.100.7 is not an address of this machine"),
    "port in use": ("127.0.0.1", None, "on 127.0.0.1 is in use; pick another --port (or 0 for the first free one)"),
}


@pytest.mark.parametrize("case", list(ADDRESS_CASES))
def test_cli_refuses_an_address_it_cannot_serve_on(case, tmp_path, tiny_policy, tiny_classifier):
    """check_address, through the real CLI: one error line, in seconds, before any weights load; nothing served,
    and the results folder shown is left as it was."""
    host, port, message = ADDRESS_CASES[case]
    results = tmp_path / "results"
    results.mkdir()
    (results / "toxicity.csv").write_text("model,mean_toxicity\ntiny,0.5\n")
    before = tree_digest(results)
    with socket.socket() as busy:  # another server on a port: the port in use
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = ["--base", tiny_policy, "--detoxified", tiny_policy, "--toxicity-model", tiny_classifier,
                "--results", results, "--host", host, "--port", port or busy.getsockname()[1]]
        line, seconds, returncode = refused_cli("compare_app.py", *argv, expect=message, timeout=60)
    intact = tree_digest(results) == before
    record_case(case, "compare_app.py", returncode, seconds, line, intact)
    assert intact


# ---------------------------------------------------------------- the committed screenshot

def main(argv):
    """python tests/test_compare_app.py OUT.png [compare_app.py arguments]: the browser check, keeping its
    screenshot."""
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    out, app_args = os.path.abspath(argv[0]), argv[1:]
    app = App(app_args, out + ".log")
    try:
        seen = drive(app.url, screenshot=out, check_results="--results" in app_args)
    finally:
        app.close()
    os.remove(out + ".log")
    print({k: v for k, v in seen.items() if k in ("answers", "verdict", "external")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
