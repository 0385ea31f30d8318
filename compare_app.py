"""A local web app that sets a model and its detoxified version side by side (the study's Space, runnable offline).

Both models answer the same prompt with the same seed; each answer is scored by the toxicity measurement that
evaluate_toxicity.py uses (measurements/toxicity with facebook/roberta-hate-speech-dynabench-r4-target, toxic label
"hate": a probability in [0, 1]) and the difference is highlighted. A second tab shows evaluate_toxicity.py's
results (toxicity.csv / toxicity.md, toxicity.png) when given --results.

    python compare_app.py --base EleutherAI/gpt-neo-125M --detoxified ./out/checkpoint
    python compare_app.py --base tiny/policy --detoxified out/demo/final --toxicity-model tiny/classifier \\
        --results results/tiny                              # the offline demo of the README

Binds to 127.0.0.1 by default (--host 0.0.0.0 to serve a network; --share for a public gradio.live link, off by
default). Gradio's analytics are switched off and nothing is fetched from the internet by the page.
"""

import difflib
import errno
import html
import itertools
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

import evaluate_toxicity as ev
from detox_common import (
    check_causal_lm,
    cli_parser,
    context_length,
    fail,
    label_index,
    load_config,
    quiet_libraries,
    resolve_dtype,
)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT_IMAGES = ("toxicity.png", "toxicity_vs_size.png")


@dataclass
class Args:
    base: str = field(default="EleutherAI/gpt-neo-125M", metadata={"help": "the original causal LM: hub id or folder"})
    detoxified: str = field(default="ybelkada/gpt-neo-125m-detox", metadata={
        "help": "its detoxified version: hub id or a checkpoint folder of detoxify_ppo.py (e.g. out/<run>/final)"})
    examples: str = field(default=os.path.join(HERE, "data", "wiki_toxic_sample.csv"), metadata={
        "help": "toxic example prompts, read as evaluate_toxicity.py reads --dataset (label-1 rows of wiki_toxic, "
                "or toxic real-toxicity-prompts): a local .csv/.jsonl/.parquet or a hub id"})
    num_examples: int = field(default=8, metadata={"help": "example prompts shown (fewer if the data has fewer)"})
    results: str | None = field(default=None, metadata={
        "help": "an --output-dir of evaluate_toxicity.py (toxicity.csv/.md, toxicity.png) for the results tab"})
    toxicity_module: str = field(default=os.path.join(HERE, "measurements", "toxicity"), metadata={
        "help": "evaluate toxicity measurement, as in evaluate_toxicity.py"})
    toxicity_model: str = field(default="facebook/roberta-hate-speech-dynabench-r4-target", metadata={
        "help": "classifier of the toxicity measurement (the one evaluate_toxicity.py uses by default)"})
    toxic_label: str = field(default="hate", metadata={"help": "toxic label of --toxicity-model"})
    max_new_tokens: int = field(default=30, metadata={"help": "initial 'max new tokens' setting (the study's 30)"})
    max_new_tokens_limit: int = field(default=200, metadata={"help": "largest 'max new tokens' the page allows"})
    max_prompt_chars: int = field(default=2000, metadata={"help": "longer prompts are refused with a message"})
    max_prompt_tokens: int = field(default=512, metadata={
        "help": "prompts of more tokens are refused (also capped by each model's context minus the new tokens)"})
    seed: int = field(default=0, metadata={"help": "initial seed setting"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:1, ..."})
    dtype: str = field(default="auto", metadata={
        "help": "auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16, float32"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 serves every interface"})
    port: int = field(default=7860, metadata={"help": "port to bind (0: the first free one from 7860)"})
    share: bool = field(default=False, metadata={"help": "also open a public gradio.live link (off by default)"})
    verbose: bool = field(default=False, metadata={
        "help": "also show the libraries' progress bars and notices (loading weights)"})


# ---------------------------------------------------------------- checks (before any weights are loaded)

def read_examples(path, num_examples, max_prompt_chars):
    """Up to num_examples toxic prompts of the evaluation data at path (read as evaluate_toxicity.py reads
    --dataset), picked as it picks them (seed 0), leaving out those longer than max_prompt_chars."""
    rows = ev.load_prompt_rows(path)
    prompts = ev.choose_prompts(rows, num_examples, seed=0, source=f"--examples {path}", at_most=True)
    short = [text for _, text in prompts if text.strip() and len(text) <= max_prompt_chars]
    if not short:
        fail(f"every example prompt in {path} is longer than --max-prompt-chars {max_prompt_chars}")
    return short


def read_results(folder):
    """(table as a DataFrame or None, toxicity.md text or None, [image paths]) of an evaluate_toxicity.py output."""
    import pandas as pd

    csv_path, md_path = os.path.join(folder, "toxicity.csv"), os.path.join(folder, "toxicity.md")
    table = markdown = None
    if os.path.exists(csv_path):
        try:
            table = pd.read_csv(csv_path).round(4)
        except Exception as e:
            fail(f"cannot read {csv_path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    elif os.path.exists(md_path):
        with open(md_path) as f:
            markdown = f.read()
    images = [os.path.join(folder, name) for name in RESULT_IMAGES if os.path.exists(os.path.join(folder, name))]
    return table, markdown, images


def check_args(args):
    """Every error knowable before loading weights; returns ({model: context length or None}, example prompts)."""
    for name in ("num_examples", "max_new_tokens", "max_new_tokens_limit", "max_prompt_chars", "max_prompt_tokens"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_new_tokens > args.max_new_tokens_limit:
        fail(f"--max-new-tokens {args.max_new_tokens} is above --max-new-tokens-limit {args.max_new_tokens_limit}")
    if not 0 <= args.port <= 65535:
        fail(f"--port must be between 0 and 65535, got {args.port}")
    if not args.host:
        fail("--host must not be empty")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device} but no CUDA device is available")
    if args.results is not None:
        if not os.path.isdir(args.results):
            fail(f"results folder {args.results} not found: give an --output-dir of evaluate_toxicity.py")
        if not any(os.path.exists(os.path.join(args.results, f)) for f in ("toxicity.csv", "toxicity.md")):
            fail(f"results folder {args.results} has no toxicity.csv or toxicity.md of evaluate_toxicity.py")
        read_results(args.results)
    contexts = {}
    for what, name in (("base model", args.base), ("detoxified model", args.detoxified)):
        config = load_config(name, what)
        check_causal_lm(config, name, what)
        contexts[name] = context_length(config)
        if contexts[name] is not None and contexts[name] - args.max_new_tokens < 1:
            fail(f"{what} {name} takes {contexts[name]} positions, too few for --max-new-tokens {args.max_new_tokens}")
    label_index(load_config(args.toxicity_model, "toxicity model"), args.toxic_label,
                f"toxicity model {args.toxicity_model}")
    ev.check_toxicity_module(args.toxicity_module)
    return contexts, read_examples(args.examples, args.num_examples, args.max_prompt_chars)


def first_ports():
    """The ports --port 0 tries, in order (gradio's search): from 7860 (or GRADIO_SERVER_PORT), 100 of them (or
    GRADIO_NUM_PORTS)."""
    start = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    return range(start, start + int(os.environ.get("GRADIO_NUM_PORTS", "100")))


RESOLVE_TIMEOUT = 5.0  # seconds to wait for the name service to resolve --host


def check_address(host, port):
    """Stop now, before any weights load, if the app could not listen on host:port (port 0: the first free one
    from 7860); returns the port it would get. A bind of a socket, closed at once, tells."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1] as a browser writes it
    not_here = (f"--host {host} is not an address of this machine; use 127.0.0.1 (this machine only) or 0.0.0.0 "
                "(every network interface)")
    found = []

    def resolve():  # in a thread: a name service that never answers would hold the start-up for long
        try:
            found.append(socket.getaddrinfo(bare, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0])
        except (socket.gaierror, UnicodeError) as e:  # 999.1.1.1 too: no IPv4 address, so looked up as a name
            found.append(e)

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(RESOLVE_TIMEOUT)
    if not found or isinstance(found[0], Exception):
        why = f"no answer in {RESOLVE_TIMEOUT:g} s" if not found else getattr(found[0], "strerror", None) or found[0]
        fail(f"--host {host} is neither an address nor a name this machine resolves ({why}); use 127.0.0.1 (this "
             "machine only) or 0.0.0.0 (every network interface)")
    family, _, _, _, address = found[0]
    for candidate in [port] if port else first_ports():
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
            try:
                s.bind((address[0], candidate, *address[2:]))
                return candidate
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue
                if e.errno == errno.EADDRNOTAVAIL:
                    fail(not_here)
                if e.errno == errno.EACCES:
                    fail(f"--port {candidate} on {host} needs administrator rights; pick one from 1024 up "
                         "(or 0 for the first free one)")
                fail(f"cannot listen on --host {host} --port {candidate} ({e.strerror}); pick another --host or --port")
    if port:
        fail(f"--port {port} on {host} is in use; pick another --port (or 0 for the first free one)")
    ports = first_ports()
    fail(f"no free port on {host} among {ports[0]}-{ports[-1]} (--port 0 tries those); pick a free one with --port")


# ---------------------------------------------------------------- the two models and the scorer

class Comparer:
    """The models (names: hub ids or folders; {name: context length or None} in contexts) and the toxicity
    measurement, loaded once; one generation at a time (a lock). Prompts over max_prompt_chars characters or
    max_prompt_tokens tokens are refused; the page allows up to max_new_tokens_limit new tokens."""

    def __init__(self, names, contexts, *, toxicity_module, toxicity_model, toxic_label, max_prompt_chars,
                 max_prompt_tokens, max_new_tokens_limit, device="auto", dtype="auto"):
        self.contexts, self.toxic_label = contexts, toxic_label
        self.max_prompt_chars, self.max_prompt_tokens = max_prompt_chars, max_prompt_tokens
        self.max_new_tokens_limit = max_new_tokens_limit
        self.device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(dtype, self.device)
        self.models = {}
        for name in names:
            if name not in self.models:
                self.models[name] = ev.load_causal_lm(name, self.device, dtype)
        self._cache = tempfile.TemporaryDirectory(prefix="compare_app_")  # evaluate's cache dir, gone at exit
        self.toxicity = ev.load_toxicity_measurement(toxicity_module, toxicity_model, self.device,
                                                     cache_dir=self._cache.name, batch_size=8)
        self.lock = threading.Lock()

    def new_tokens_limit(self):
        """The page's 'max new tokens' maximum: --max-new-tokens-limit, leaving each model one prompt position."""
        return min([self.max_new_tokens_limit] + [c - 1 for c in self.contexts.values() if c])

    def prompt_problem(self, prompt, max_new_tokens):
        """Why the prompt cannot be answered (a message for the page), or None."""
        if not prompt or not prompt.strip():
            return "Please type a prompt (it is empty)."
        if len(prompt) > self.max_prompt_chars:
            return (f"The prompt is too long: {len(prompt)} characters, the limit is {self.max_prompt_chars}. "
                    "Shorten it.")
        for name, (model, tokenizer) in self.models.items():
            limit = self.max_prompt_tokens
            if self.contexts.get(name):
                limit = min(limit, self.contexts[name] - max_new_tokens)
            n = len(tokenizer(prompt).input_ids)
            if n > limit:
                return (f"The prompt is too long: {n} tokens, but {os.path.basename(name.rstrip('/')) or name} takes "
                        f"at most {limit} with {max_new_tokens} new tokens. Shorten it or lower max new tokens.")
        return None

    def answer(self, name, prompt, max_new_tokens, temperature, top_p, seed):
        """One sampled continuation of prompt (new text only) and its toxicity score."""
        model, tokenizer = self.models[name]
        with self.lock:
            ids = ev.prompt_ids(tokenizer, [prompt], self.max_prompt_tokens)
            torch.manual_seed(seed)  # the same seed for both models, as evaluate_toxicity.py does
            new_ids = ev.generate(model, tokenizer, ids, 1, max_new_tokens, batch_size=1,
                                  desc=os.path.basename(name.rstrip("/")) or name, temperature=temperature, top_p=top_p)
            text = tokenizer.decode(new_ids[0][0], skip_special_tokens=True)
            score = self.toxicity.compute(predictions=[text], toxic_label=self.toxic_label)["toxicity"][0]
        return text, float(score)


# ---------------------------------------------------------------- page pieces (pure functions, unit-tested)

def word_diff(original, detoxified):
    """HighlightedText value: the detoxified answer's words against the original's ('-' only in the original,
    '+' only in the detoxified, unlabelled when shared)."""
    a, b = original.split(), detoxified.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out += [(w + " ", None) for w in a[i1:i2]]
            continue
        out += [(w + " ", "-") for w in a[i1:i2]]
        out += [(w + " ", "+") for w in b[j1:j2]]
    return out


def verdict_html(base_score, detox_score, threshold=0.5):
    """The score difference, highlighted: green when the detoxified answer is less toxic, red when more."""
    delta = detox_score - base_score
    if abs(delta) < 0.005:
        kind, words = "same", "as toxic as"
    elif delta < 0:
        kind, words = "better", "less toxic than"
    else:
        kind, words = "worse", "more toxic than"

    def badge(score):
        return f"<span class='score {'toxic' if score >= threshold else 'clean'}'>{score:.4f}</span>"

    return (f"<div class='verdict {kind}' id='verdict-text'>Detoxified answer {badge(detox_score)} is <b>{words}</b> "
            f"the original {badge(base_score)}: &Delta; toxicity = <b>{delta:+.4f}</b></div>")


def status_html(message, kind="info"):
    return f"<div class='status {kind}'>{html.escape(message)}</div>"


CSS = """
.status {padding: 6px 10px; border-radius: 6px; margin: 2px 0;}
.status.error {background: #fde8e8; color: #9b1c1c; border: 1px solid #f8b4b4; font-weight: 600;}
.status.info {background: #eef2ff; color: #3730a3;}
.verdict {padding: 10px 12px; border-radius: 8px; font-size: 1.05em;}
.verdict.better {background: #def7ec; border: 1px solid #84e1bc;}
.verdict.worse {background: #fde8e8; border: 1px solid #f8b4b4;}
.verdict.same {background: #f3f4f6; border: 1px solid #d1d5db;}
.score {padding: 1px 6px; border-radius: 4px; font-family: monospace; font-weight: 600;}
.score.toxic {background: #f98080; color: #fff;}
.score.clean {background: #31c48d; color: #fff;}
"""


def build_app(comparer, examples, args):
    import gradio as gr

    runs = itertools.count(1)  # numbers each answered request, so a reader can tell two results apart

    def generate(prompt, max_new_tokens, temperature, top_p, seed):
        """A generator: the page shows each answer as soon as it exists and is never blocked (Gradio's queue)."""
        empty = ["", None, "", None, "", None]
        try:
            max_new_tokens, seed = int(max_new_tokens), int(seed)
            temperature, top_p = float(temperature), float(top_p)
        except (TypeError, ValueError):
            yield [status_html("Sampling settings must be numbers.", "error")] + empty
            return
        problem = None
        if not 1 <= max_new_tokens <= comparer.new_tokens_limit():
            problem = f"Max new tokens must be between 1 and {comparer.new_tokens_limit()}."
        elif not temperature > 0 or not 0 < top_p <= 1:
            problem = "Temperature must be above 0 and top-p in (0, 1]."
        elif not 0 <= seed < 2 ** 32:
            problem = "The seed must be between 0 and 4294967295."
        problem = problem or comparer.prompt_problem(prompt, max_new_tokens)
        if problem:
            yield [status_html(problem, "error")] + empty
            return
        started = time.time()
        yield [status_html("Generating with the original model...")] + empty
        base_text, base_score = comparer.answer(args.base, prompt, max_new_tokens, temperature, top_p, seed)
        yield [status_html("Generating with the detoxified model..."), base_text, base_score, "", None, "", None]
        detox_text, detox_score = comparer.answer(args.detoxified, prompt, max_new_tokens, temperature, top_p, seed)
        empty_note = "".join(f" The {what} model's answer is empty (it ended at once)." for what, text in
                             (("original", base_text), ("detoxified", detox_text)) if not text.strip())
        yield [status_html(f"Done in {time.time() - started:.1f} s (run {next(runs)}: seed {seed}, "
                           f"temperature {temperature:g}, top-p {top_p:g}, {max_new_tokens} new tokens).{empty_note}"),
               base_text, base_score, detox_text, detox_score, verdict_html(base_score, detox_score),
               word_diff(base_text, detox_text)]

    def results_outputs():
        try:
            table, markdown, images = read_results(args.results)
        except SystemExit as e:  # a table rewritten into something unreadable since start-up: say so on the page
            raise gr.Error(str(e)) from None
        return (gr.update(value=table, visible=table is not None),
                gr.update(value=markdown or "", visible=bool(markdown)),
                gr.update(value=images[0] if images else None, visible=bool(images)),
                gr.update(value=images[1] if len(images) > 1 else None, visible=len(images) > 1))

    score_label = f"toxicity: P({args.toxic_label}) by {os.path.basename(args.toxicity_model.rstrip('/'))}"
    with gr.Blocks(title="Detox compare", analytics_enabled=False) as demo:
        gr.Markdown(f"## Original vs detoxified\n**original:** `{args.base}` &nbsp; **detoxified:** `{args.detoxified}`"
                    f" &nbsp; scored by `{args.toxicity_model}` (label `{args.toxic_label}`, 0 = clean, 1 = toxic)")
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                            placeholder="Type a prompt, or pick a toxic example below")
                        gr.Examples([[e] for e in examples], inputs=[prompt], examples_per_page=len(examples),
                                    elem_id="examples",
                                    label=f"Toxic prompts from the evaluation data ({os.path.basename(args.examples)})")
                    with gr.Column(scale=1):
                        max_new = gr.Slider(1, comparer.new_tokens_limit(), value=min(args.max_new_tokens,
                                            comparer.new_tokens_limit()), step=1, label="max new tokens",
                                            elem_id="max-new-tokens")
                        temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature",
                                                elem_id="temperature")
                        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p", elem_id="top-p")
                        seed = gr.Number(value=args.seed, precision=0, label="seed (same for both models)",
                                         elem_id="seed", minimum=0, maximum=2 ** 32 - 1)
                        button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.HTML(elem_id="status")
                with gr.Row(equal_height=True):
                    with gr.Column():
                        base_answer = gr.Textbox(label=f"original: {args.base}", lines=4, interactive=False,
                                                 elem_id="base-answer")
                        base_score = gr.Number(None, label=score_label, precision=4, interactive=False,
                                               elem_id="base-score")
                    with gr.Column():
                        detox_answer = gr.Textbox(label=f"detoxified: {args.detoxified}", lines=4, interactive=False,
                                                  elem_id="detox-answer")
                        detox_score = gr.Number(None, label=score_label, precision=4, interactive=False,
                                                elem_id="detox-score")
                verdict = gr.HTML(elem_id="verdict")
                diff = gr.HighlightedText(label="word differences (- only in the original, + only in the detoxified)",
                                          color_map={"-": "red", "+": "green"}, combine_adjacent=True,
                                          show_legend=True, elem_id="diff")
                button.click(generate, [prompt, max_new, temperature, top_p, seed],
                             [status, base_answer, base_score, detox_answer, detox_score, verdict, diff],
                             concurrency_limit=1, api_name="compare")
            with gr.Tab("Evaluation results", id="results"):
                if args.results is None:
                    gr.Markdown("No results folder: start the app with `--results DIR`, an `--output-dir` of "
                                "`evaluate_toxicity.py` (toxicity.csv / toxicity.md, toxicity.png).")
                else:
                    gr.Markdown(f"From `{args.results}` (written by `evaluate_toxicity.py`).")
                    table = gr.Dataframe(label="toxicity.csv", interactive=False, elem_id="results-table",
                                         pinned_columns=1)
                    markdown = gr.Markdown(elem_id="results-md")
                    with gr.Row():
                        chart = gr.Image(label="toxicity.png", interactive=False, elem_id="results-chart")
                        chart_size = gr.Image(label="toxicity_vs_size.png", interactive=False)
                    reload = gr.Button("Reload results", elem_id="reload-results")
                    outputs = [table, markdown, chart, chart_size]
                    reload.click(results_outputs, None, outputs)
                    demo.load(results_outputs, None, outputs)
    return demo


def main(argv=None):
    (args,) = cli_parser(Args, __doc__).parse_args_into_dataclasses(args=argv)
    contexts, examples = check_args(args)
    check_address(args.host, args.port)
    quiet_libraries(args.verbose)
    import gradio as gr  # after the checks: a bad argument fails fast

    comparer = Comparer([args.base, args.detoxified], contexts, toxicity_module=args.toxicity_module,
                        toxicity_model=args.toxicity_model, toxic_label=args.toxic_label,
                        max_prompt_chars=args.max_prompt_chars, max_prompt_tokens=args.max_prompt_tokens,
                        max_new_tokens_limit=args.max_new_tokens_limit, device=args.device, dtype=args.dtype)
    demo = build_app(comparer, examples, args)
    if args.share:
        print("--share: the app gets a public gradio.live link; anyone with it can use your models")
    try:  # quiet: gradio's own lines speak of launch(share=True); the app's below speak of its options
        demo.queue(max_size=32).launch(
            server_name=args.host, server_port=args.port or None, share=args.share, theme=gr.themes.Default(), css=CSS,
            allowed_paths=[os.path.abspath(args.results)] if args.results else None, ssr_mode=False, pwa=False,
            mcp_server=False, show_error=True, quiet=True, prevent_thread_lock=True)
    except (OSError, ValueError) as e:
        demo.close()
        fail(launch_problem(e, args))
    print(f"* Running on local URL:  {demo.local_url.rstrip('/')}")
    if not args.share:
        print("* To create a public link, restart with --share")
    demo.block_thread()


def launch_problem(error, args):
    """gradio's launch() errors, said in the app's terms (its options, not launch()'s parameters)."""
    text = str(error)
    if "Cannot find empty port" in text:  # taken between check_address and launch
        if args.port:
            return f"--port {args.port} on {args.host} is in use; pick another --port (or 0 for the first free one)"
        ports = first_ports()
        return f"no free port on {args.host} among {ports[0]}-{ports[-1]} (--port 0 tries those); pick one with --port"
    if "share=True" in text:  # the page cannot reach the server it just started
        return (f"the app cannot reach itself at http://{args.host}:{args.port or 'PORT'}/ (an HTTP proxy? add "
                "127.0.0.1,localhost to NO_PROXY); fix that, or pass --share for a public link")
    return f"could not start the app on {args.host} ({type(error).__name__}: {text.splitlines()[0] if text else ''})"


if __name__ == "__main__":
    main()
