"""Code both scripts need: loading datasets and classifiers by hub id or local path, with one-line errors."""

import os

import torch

DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Markers around the evaluation table in a checkpoint's README.md model card (written by detoxify_ppo.py,
# filled by evaluate_toxicity.py --update-model-card).
CARD_RESULTS_START, CARD_RESULTS_END = "<!-- evaluate_toxicity.py results -->", "<!-- end of evaluate_toxicity.py results -->"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fail(message):
    """Stop with a one-line error on stderr and exit status 1 (raising SystemExit keeps it testable)."""
    raise SystemExit(f"error: {message}")


def load_rows(name, split="train", **hub_kwargs):
    """A `datasets.Dataset` from a hub id, a local .jsonl/.json/.parquet/.csv file, or a folder of them."""
    import datasets

    if os.path.isfile(name):
        ext = os.path.splitext(name)[1].lower()
        if ext not in DATA_FILE_TYPES:
            fail(f"dataset file {name} is not one of {', '.join(DATA_FILE_TYPES)}")
        return datasets.load_dataset(DATA_FILE_TYPES[ext], data_files=name, split="train")
    if os.path.isdir(name):
        files = sorted(f for f in os.listdir(name) if os.path.splitext(f)[1].lower() in DATA_FILE_TYPES)
        types = {DATA_FILE_TYPES[os.path.splitext(f)[1].lower()] for f in files}
        if len(types) != 1:
            fail(f"dataset folder {name} must hold files of one type among {', '.join(DATA_FILE_TYPES)}")
        split_files = [f for f in files if os.path.splitext(f)[0] == split]
        chosen = split_files or files  # a folder of train.csv/test.csv picks the split, else takes them all
        return datasets.load_dataset(types.pop(), data_files=[os.path.join(name, f) for f in chosen], split="train")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        fail(f"dataset {name} not found: give an existing file or folder, or a hub id such as owner/name")
    try:
        return datasets.load_dataset(name, split=split, **hub_kwargs)
    except Exception as e:  # datasets raises many types for "not found" / "offline"
        fail(f"could not load dataset {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             "check the hub id and your connection, or pass a local .jsonl/.csv/.parquet file")


def load_config(name, what="model", trust_remote_code=False):
    """The model's config, fetched before any weights so a wrong name fails fast and cheaply."""
    from transformers import AutoConfig

    if name.startswith((".", "/", "~")) and not os.path.isdir(name):
        fail(f"{what} {name} not found: no such folder")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        fail(f"could not load {what} {name} ({str(e).splitlines()[0]}); check the hub id or the local path")


def label_index(config, label, what="classifier"):
    """Index of `label` in the classifier's id2label; a clear error naming the labels it has."""
    id2label = {int(i): str(l) for i, l in (config.id2label or {}).items()}
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


def load_classifier(name, device, dtype=None):
    """(tokenizer, model) of a sequence classifier in eval mode on `device`; half precision on GPU by default."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

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
