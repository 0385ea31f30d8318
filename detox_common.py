"""Code both scripts need: loading datasets and classifiers by hub id or local path, with one-line errors."""

import argparse
import fcntl
import functools
import io
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request

import torch

DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Markers around the evaluation table in a checkpoint's README.md model card (written by detoxify_ppo.py,
# filled by evaluate_toxicity.py --update-model-card).
CARD_RESULTS_START = "<!-- evaluate_toxicity.py results -->"
CARD_RESULTS_END = "<!-- end of evaluate_toxicity.py results -->"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fail(message):
    """Stop with a one-line error on stderr and exit status 1 (raising SystemExit keeps it testable)."""
    raise SystemExit(f"error: {message}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each default shown once (not for options whose help states it, nor for unset ones and --no-FLAG); the
    script's description and examples as written."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "") or action.option_strings[0].startswith("--no"):
            return action.help
        return super()._get_help_string(action)


def write_atomic(path, data):
    """Write text or bytes to PATH.tmp, fsync it, rename it over PATH and fsync the folder: a crash, a kill or a full
    disk leaves either the old file or the new one, whole (a leftover PATH.tmp is simply overwritten next time)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"cannot write {path} ({e.strerror}); free some space or fix the folder's permissions, then run again "
             "(the file as it was before is unchanged)")
    fsync_folder(os.path.dirname(path) or ".")


def fsync_folder(folder):
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_figure(fig, path, dpi=120):
    """A matplotlib figure as PNG, written atomically (write_atomic)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())


class OutputLock:
    """One run at a time in an output folder: an exclusive flock on FOLDER/.detox.lock, held until the run ends.
    The kernel drops it when the process dies however it dies (kill -9 too), so a lock file left behind never blocks
    a later run; the file names its holder for the message a second run gets. Under `accelerate launch` only the
    process of RANK 0 takes it. Leaving the `with` block, a folder this run created and left empty is removed, so
    a refused run leaves nothing behind."""

    FILE = ".detox.lock"

    def __init__(self, folder, what):
        self.folder, self.what, self.fd = folder, what, None
        self.created = not os.path.exists(folder)

    def __enter__(self):
        if os.environ.get("RANK", "0") != "0":
            return self
        try:
            os.makedirs(self.folder, exist_ok=True)
            self.fd = os.open(os.path.join(self.folder, self.FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            fail(f"--output-dir {self.folder} is not writable ({e.strerror}); pick another folder")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0)
            os.close(self.fd)
            self.fd = None
            fail(self.in_use(self.folder, holder))
        os.ftruncate(self.fd, 0)
        command = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]
        os.pwrite(self.fd, f"{self.what} (pid {os.getpid()} on {socket.gethostname()}, started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command})\n".encode(), 0)
        return self

    @classmethod
    def refuse_if_held(cls, folder):
        """Refuse at once, naming the holder, when another run holds folder (before checks that would misread its
        files as an earlier run's)."""
        path = os.path.join(folder, cls.FILE)
        if not os.path.isfile(path) or os.environ.get("RANK", "0") != "0":
            return
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)  # let go when the file closes
            except BlockingIOError:
                fail(cls.in_use(folder, f.read(4096)))

    @staticmethod
    def in_use(folder, holder):
        holder = holder.decode(errors="replace").strip() or "another process"
        return f"--output-dir {folder} is in use by {holder}; wait for it to end, or pick another folder"

    def __exit__(self, *exc):
        if self.fd is None:
            return
        if self.created and os.listdir(self.folder) == [self.FILE]:
            os.remove(os.path.join(self.folder, self.FILE))
            os.rmdir(self.folder)
        os.close(self.fd)  # closing the file drops the flock
        self.fd = None


def cli_parser(dataclass_types, doc, no_flag_help=None, error_context=""):
    """The HfArgumentParser of a script: its docstring's first paragraph on top of --help, the rest (examples)
    below; --dash-options first, as the README writes them; no_flag_help: dest -> help of its --no-FLAG. A parse
    error is one `error:` line, which starts with error_context (e.g. the config file it comes from)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse's usage block and "prog: error:" become the one line of every refusal
            fail(f"{error_context}{message}; see --help")

        def parse_args_into_dataclasses(self, args=None, **kwargs):
            *parsed, unknown = super().parse_args_into_dataclasses(args=args, return_remaining_strings=True, **kwargs)
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
            return tuple(parsed)

    summary, _, details = doc.strip().partition("\n\n")
    parser = Parser(dataclass_types, formatter_class=HelpFormatter, description=summary, epilog=details)
    for action in parser._actions:
        action.option_strings.sort(key=lambda name: "_" in name)
        if no_flag_help and action.option_strings[0].startswith("--no-"):
            action.help = no_flag_help[action.dest]
    return parser


def reward_terms(reward_models, reward_labels, reward_weights):
    """[(classifier, label, weight)] of detoxify_ppo.py's reward; one label or weight applies to every classifier."""
    n = len(reward_models)
    if n == 0 or len(reward_labels) not in (1, n) or len(reward_weights) not in (1, n):
        fail(f"--reward-model got {n} classifier(s): give one --reward-label and one --reward-weight, or one of each "
             f"per classifier (got {len(reward_labels)} and {len(reward_weights)})")
    if not all(math.isfinite(w) for w in reward_weights):
        fail(f"--reward-weight must be finite numbers, got {reward_weights}")
    return [(model, reward_labels[i % len(reward_labels)], float(reward_weights[i % len(reward_weights)]))
            for i, model in enumerate(reward_models)]


def quiet_libraries(verbose, evaluate_library=True):
    """Only the script's own progress bar and lines, unless --verbose: the libraries' bars (loading weights, writing
    shards, datasets' map/filter/json, evaluate's downloads) and notices would bury them. evaluate_library=False
    leaves `evaluate` alone (importing it takes seconds) for a script that never uses it."""
    if verbose:
        return
    import datasets
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    if evaluate_library:
        import evaluate

        evaluate.logging.set_verbosity_error()
        evaluate.logging.disable_progress_bar()


HUB_TIMEOUT = 3.0  # seconds to wait for a TCP connection to the hub before calling it unreachable
# the way out when nothing can be fetched: the offline demo of README "Run"
OFFLINE_DEMO = ('run the offline demo of README "Run" (python scripts/make_tiny_models.py tiny builds tiny/policy and '
                'tiny/classifier, local stand-ins for the models)')


def env_true(name):
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline(dataset=False):
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE; HF_DATASETS_OFFLINE too for a dataset) keeps the hub off."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or (dataset and env_true("HF_DATASETS_OFFLINE"))


def in_hub_cache(name, repo_type="model"):
    """Whether the local Hugging Face cache holds a download of hub id `name` (a model or a dataset)."""
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{name.replace('/', '--')}", "snapshots")
    if os.path.isdir(folder) and os.listdir(folder):
        return True
    if repo_type == "dataset":  # datasets also keeps prepared copies in its own cache
        cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
        return os.path.isdir(os.path.join(cache, name.replace("/", "___")))
    return False


@functools.lru_cache(maxsize=None)
def hub_unreachable(endpoint):
    """None when a TCP connection to the endpoint's host (or to the proxy the environment names for it) opens within
    HUB_TIMEOUT seconds, else why not (a short text). Asked once per process and endpoint."""
    parts = urllib.parse.urlsplit(endpoint)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):  # through a proxy: the proxy is what must answer
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname, proxy_parts.port or 80
    result = []

    def connect():  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=HUB_TIMEOUT).close()
            result.append(None)
        except (OSError, UnicodeError) as e:
            result.append(f"{host}:{port}: {getattr(e, 'strerror', None) or e or type(e).__name__}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT + 1)
    return result[0] if result else f"{host}:{port}: no answer in {HUB_TIMEOUT:g} s"


def check_hub_reachable(name, what, repo_type="model"):
    """Stop at once, naming the ways out, when hub id `name` would be fetched from a hub that cannot be reached
    (instead of the libraries' retries, about 30 s, and a vague error). Nothing to check when offline mode is on."""
    from huggingface_hub import constants

    if hub_offline(dataset=repo_type == "dataset"):
        return
    reason = hub_unreachable(constants.ENDPOINT)
    if reason is None:
        return
    cached = ""
    if repo_type is not None:
        cached = f" ({name} is {'' if in_hub_cache(name, repo_type) else 'not '}in it)"
    fail(f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}, {reason}) to fetch {what} {name}; "
         f"set HF_HUB_OFFLINE=1 to use only the local cache{cached} or pass a local "
         f"{'file or folder' if repo_type != 'model' else 'folder'}, or {OFFLINE_DEMO}")


def not_in_cache(name, what, repo_type="model"):
    """The error for a hub id that offline mode cannot fetch and the local cache lacks."""
    local = "file or folder" if repo_type == "dataset" else "folder"
    fail(f"could not load {what} {name}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 keeps the hub "
         f"off; unset HF_HUB_OFFLINE to download it, pass a local {local}, or {OFFLINE_DEMO}")


def looks_like_path(name, dataset=False):
    """Whether `name` can only be a local path: it starts with . / ~, has several /, a backslash, a data-file extension
    (datasets), or is owner/name where the folder `owner` exists here. One "owner/name" is otherwise a hub id."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if dataset and os.path.splitext(name)[1].lower() in DATA_FILE_TYPES:
        return True
    return name.count("/") == 1 and os.path.isdir(name.split("/")[0])


def resolve_name(name, what, dataset=False):
    """"local" or "hub" for a model (a folder) or dataset (a file or folder) name, stopping at once with a one-line
    error for a local path that does not exist, a file given for a folder, a name that is neither, or a hub id that
    cannot be fetched (hub unreachable)."""
    kind = "file or folder" if dataset else "folder"
    if os.path.isfile(name) and not dataset:
        fail(f"{what} {name} is a file; give the folder that holds its config.json and weights")
    if os.path.exists(name):
        return "local"
    if looks_like_path(name, dataset):
        hint = ""
        if name.startswith("~") and os.path.exists(os.path.expanduser(name)):
            hint = f" (~ is not expanded here: write {os.path.expanduser(name)})"
        fail(f"{what} {name} not found: no such {kind}{hint}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        fail(f"{what} {name} not found: no such {kind}, and it is not a hub id (owner/name)")
    check_hub_reachable(name, what, "dataset" if dataset else "model")
    return "hub"


def load_rows(name, split="train", **hub_kwargs):
    """A `datasets.Dataset` from a hub id, a local .jsonl/.json/.parquet/.csv file, or a folder of them."""
    import datasets

    resolve_name(name, "dataset", dataset=True)
    if os.path.isfile(name):
        ext = os.path.splitext(name)[1].lower()
        if ext not in DATA_FILE_TYPES:
            fail(f"dataset file {name} is not one of {', '.join(DATA_FILE_TYPES)}")
        return load_data_files(DATA_FILE_TYPES[ext], [name])
    if os.path.isdir(name):
        files = sorted(f for f in os.listdir(name) if os.path.splitext(f)[1].lower() in DATA_FILE_TYPES)
        types = {DATA_FILE_TYPES[os.path.splitext(f)[1].lower()] for f in files}
        if len(types) != 1:
            fail(f"dataset folder {name} must hold files of one type among {', '.join(DATA_FILE_TYPES)}")
        split_files = [f for f in files if os.path.splitext(f)[0] == split]
        chosen = split_files or files  # a folder of train.csv/test.csv picks the split, else takes them all
        return load_data_files(types.pop(), [os.path.join(name, f) for f in chosen])
    try:
        return datasets.load_dataset(name, split=split, **hub_kwargs)
    except Exception as e:  # datasets raises many types for "not found" / "offline"
        if hub_offline(dataset=True) and not in_hub_cache(name, "dataset"):
            not_in_cache(name, "dataset", "dataset")
        fail(f"could not load dataset {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             "check the hub id and your connection, or pass a local .jsonl/.csv/.parquet file")


def load_data_files(kind, files):
    """A `datasets.Dataset` of local files of one kind (json, csv, parquet); an empty or unreadable file is a one-line
    error naming it, and for JSON the first line that does not parse."""
    import datasets

    for path in files:
        if os.path.getsize(path) == 0:
            fail(f"dataset file {path} is empty")
        if kind == "csv":
            with open(path, "rb") as f:
                if sum(1 for line, _ in zip(f, range(2)) if line.strip()) < 2:
                    fail(f"dataset file {path} has a header and no rows")
    logger = datasets.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(datasets.logging.CRITICAL)  # its own "Failed to read file" line would come before ours
    try:
        rows = datasets.load_dataset(kind, data_files=files, split="train")
    except Exception as e:  # datasets wraps the parser's error in DatasetGenerationError
        cause = e.__cause__ or e
        where = next(filter(None, map(first_bad_json_line, files)), None) if kind == "json" else None
        fail(f"cannot read dataset {where or ', '.join(files)} ({type(cause).__name__}: "
             f"{str(cause).splitlines()[0][:200] if str(cause) else ''}); fix the file or give another --dataset")
    finally:
        logger.setLevel(level)
    if len(rows) == 0:
        fail(f"dataset {', '.join(files)} has no rows; give a file with some")
    return rows


def json_lines(path):
    """(line number, parsed value or the ValueError it raised, the line) for each non-blank line of a JSON-lines
    file."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line), line
                except ValueError as e:
                    yield number, e, line


def first_bad_json_line(path):
    """'PATH line N: ...' for the first line of a JSON-lines file that is not a JSON object, or None."""
    for number, row, line in json_lines(path):
        if isinstance(row, ValueError):
            if number == 1 and line.lstrip()[:1] in (b"[", b"{"):  # maybe one JSON document, not JSON lines
                return None
            return f"{path} line {number} ({row})"
        if not isinstance(row, dict):
                return f"{path} line {number} (a JSON {type(row).__name__}, not an object of fields)"
    return None


def load_config(name, what="model", trust_remote_code=False):
    """The model's config, fetched before any weights so a wrong name fails fast and cheaply."""
    from transformers import AutoConfig

    local = resolve_name(name, what) == "local"
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if not local and hub_offline() and not in_hub_cache(name):
            not_in_cache(name, what)
        fail(f"could not load {what} {name} ({str(e).splitlines()[0]}); check the hub id or the local path")


def context_length(config):
    """Most positions the model accepts, or None if its config does not say."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_causal_lm(config, name, what="model"):
    """Refuse a config that cannot give a causal LM: a model type without such a head, or a saved model of
    another head (a classifier of a causal-capable type would load with a random LM head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        fail(f"{what} {name} is a {config.model_type}, which has no causal LM head")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if config.architectures and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel"))
                                        for a in config.architectures):
        fail(f"{what} {name} is a {', '.join(config.architectures)}, not a causal LM")


def check_sequence_classifier(config, name, what="classifier"):
    """Refuse a config that is not a sequence classifier (a causal LM given as the reward model would load with a
    random classification head and train on noise)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        fail(f"{what} {name} is a {config.model_type}, which has no sequence classification head")
    if config.architectures and not any(a.endswith("ForSequenceClassification") for a in config.architectures):
        fail(f"{what} {name} is a {', '.join(config.architectures)}, not a sequence classifier; give a "
             "...ForSequenceClassification model")


def label_index(config, label, what="classifier"):
    """Index of `label` in the classifier's id2label; a clear error naming the labels it has."""
    id2label = {int(i): str(name) for i, name in (config.id2label or {}).items()}
    for i, name in id2label.items():
        if name == label:
            return i
    fail(f"{what} has no label {label!r}; its labels are {sorted(id2label.values())}")


def resolve_dtype(name, device):
    """torch dtype for `name`; 'auto' is bfloat16 on GPU and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        fail(f"dtype {name} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_classifier(name, device, dtype=None, what="classifier"):
    """(tokenizer, model) of a sequence classifier in eval mode on `device`; half precision on GPU by default."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    resolve_name(name, what)
    if dtype is None:
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype).to(device).eval()
    return tokenizer, model


@torch.no_grad()
def classifier_logits(tokenizer, model, texts, batch_size=64):
    """float32 logits (len(texts), num_labels), inputs truncated to the classifier's maximum length.

    A tokenizer that adds no special tokens turns "" into 0 tokens, which the model cannot run on (a batch of
    only empty texts crashes): such texts are scored as the end-of-text token instead."""
    max_length = classifier_max_length(tokenizer, model)
    if not tokenizer("")["input_ids"]:
        texts = [t if t else (tokenizer.eos_token or " ") for t in texts]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(model.device)
        out.append(model(**enc).logits.float())
    return torch.cat(out) if out else torch.empty(0, model.config.num_labels)


def classifier_max_length(tokenizer, model):
    """Longest input the classifier accepts (RoBERTa: 514 positions, 512 usable)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # RoBERTa offsets positions by padding_idx + 1
    candidates = [x for x in (limit, tokenizer.model_max_length) if x and x < 1e9]
    return min(candidates) if candidates else 512
