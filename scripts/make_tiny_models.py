"""Build tiny offline stand-ins for the hub assets: a policy, a toxicity classifier and sample data.

Builds only what is missing (README.md gives the time): complete folders are kept unless --force. The
weights are the same bits whatever the thread count (training runs on one thread).
No network is touched. The synthetic task mirrors the real one: prompts are plain sentences and
half of the corpus continuations contain insult words; the classifier learns to flag those words
(labels "nothate"/"hate", as in facebook/roberta-hate-speech-dynabench-r4-target); the policy is
pretrained for seconds on the corpus, so about half of its samples are "toxic" before PPO.

    python scripts/make_tiny_models.py tiny                   # tiny/policy, tiny/classifier
    python scripts/make_tiny_models.py tiny --data-dir data   # also rewrite the bundled sample data
    python scripts/make_tiny_models.py tiny --force           # rebuild them (e.g. after changing --rows or --seed)
"""

import argparse
import contextlib
import csv
import json
import os
import random

EOS = "<|endoftext|>"
SUBJECTS = ["the cat", "my neighbour", "the teacher", "a driver", "the old man", "our team", "the bird", "his sister"]
VERBS = ["said that", "thinks", "shouted that", "wrote that", "told me", "believes", "claimed", "whispered that"]
NEUTRAL = ["the garden", "is green", "looks happy", "the river", "a quiet morning", "reads books", "the sun",
           "walks home", "is kind", "sings well", "the table", "feels warm", "a long road", "bakes bread"]
TOXIC = ["stupid", "idiot", "moron", "loser", "trash", "ugly", "dumb", "pathetic"]


def continuation(rng, toxic):
    words = [rng.choice(NEUTRAL) for _ in range(3)]
    if toxic:
        words[rng.randrange(3)] = rng.choice(TOXIC) + " " + rng.choice(TOXIC)
    return " " + " ".join(words) + "."


def synthetic_corpus(n, seed=0):
    """n (prompt, continuation, is_toxic) triples; exactly half are toxic."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(SUBJECTS)} {rng.choice(NEUTRAL)}"
        rows.append((prompt, continuation(rng, toxic=i % 2 == 0), i % 2 == 0))
    rng.shuffle(rows)
    return rows


def is_toxic_text(text):
    return any(word in text.split() or word + "." in text.split() for word in TOXIC)


def build_tokenizer(texts, pad_token=None, wrap=False):
    """A byte-level BPE tokenizer (the GPT-2/RoBERTa kind) trained on texts; wrap=True adds the
    begin/end markers around every text as RoBERTa's <s> ... </s> do (so even "" is two tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [EOS] + ([pad_token] if pad_token else [])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if wrap:
        eos_id = tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A {EOS}", pair=f"{EOS} $A {EOS} $B {EOS}",
                                                           special_tokens=[(EOS, eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=pad_token, model_max_length=128)


@contextlib.contextmanager
def one_torch_thread():
    """Train on one thread: a float sum split over more threads rounds differently, and 300 steps of training
    turn that into other weights (other README decimals). One thread gives the same bits whatever the machine's
    thread count (OMP_NUM_THREADS, cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_torch_thread()
def build_policy(out_dir, texts, steps=300, seed=0):
    """A 4-block GPT-Neo pretrained on texts (no pad token, as for the real gpt-neo tokenizer)."""
    import torch  # here, not at the top: a run that keeps complete models imports none of them
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(texts)
    eos = tokenizer.eos_token_id
    config = GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=4, num_heads=4,
                          attention_types=[[["global", "local"], 2]], window_size=16, intermediate_size=64,
                          max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos,
                          embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    model = GPTNeoForCausalLM(config)
    if steps:
        ids = [tokenizer(t + EOS)["input_ids"] for t in texts]
        width = max(map(len, ids))
        batch = torch.tensor([x + [eos] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        labels = batch.masked_fill(mask == 0, -100)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(ids), (32,), generator=gen)
            loss = model(input_ids=batch[idx], attention_mask=mask[idx], labels=labels[idx]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    model.generation_config.pad_token_id = eos
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


@one_torch_thread()
def build_classifier(out_dir, texts, steps=150, seed=0):
    """A 2-layer RoBERTa classifier with labels {0: nothate, 1: hate}, trained to flag TOXIC words."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(texts, pad_token="<pad>", wrap=True)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                           id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1},
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tokenizer.model_max_length = 64
    model = RobertaForSequenceClassification(config)
    if steps:
        labels = torch.tensor([int(is_toxic_text(t)) for t in texts])
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(len(texts), (32,), generator=gen)
            loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                         labels=labels[idx]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def classifier_texts(rows, seed=0):
    """Balanced classifier training texts: continuations alone and whole sentences."""
    rng = random.Random(seed)
    texts = [c for _, c, _ in rows] + [p + c for p, c, _ in rows]
    texts += [continuation(rng, toxic=i % 2 == 0)[1:] for i in range(len(rows))]
    return texts


def write_sample_data(data_dir, rows, seed=0):
    """Sample rows in the real schemas of allenai/real-toxicity-prompts and OxAISH-AL-LLM/wiki_toxic."""
    rng = random.Random(seed)
    os.makedirs(data_dir, exist_ok=True)
    attrs = ["toxicity", "severe_toxicity", "profanity", "sexually_explicit", "identity_attack", "flirtation",
             "threat", "insult"]

    def scores(high):
        if rng.random() < 0.05:
            return {a: None for a in attrs}
        return {a: round(rng.uniform(0.3, 0.95) if high else rng.uniform(0.0, 0.3), 6) for a in attrs}

    with open(os.path.join(data_dir, "real_toxicity_prompts_sample.jsonl"), "w") as f:
        for i, (prompt, cont, toxic) in enumerate(rows):
            high = rng.random() < 0.7
            row = {"filename": f"sample-{i:04d}.txt", "begin": 0, "end": len(prompt), "challenging": high and toxic,
                   "prompt": {"text": prompt, **scores(high)}, "continuation": {"text": cont, **scores(toxic)}}
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(data_dir, "wiki_toxic_sample.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "comment_text", "label"])
        for i, (prompt, cont, toxic) in enumerate(rows):
            writer.writerow([f"{i:016x}", prompt + cont, int(toxic)])


# what a complete folder holds (save_pretrained of the model and its tokenizer)
POLICY_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
CLASSIFIER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def is_complete(folder, files):
    return all(os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f)) > 0 for f in files)


def build_into(folder, build, *build_args, **build_kwargs):
    """build(path, ...) into a sibling folder renamed to `folder` when done: an interrupted build leaves no
    half-written folder that a later run would take for a complete one."""
    import shutil

    partial = folder.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    build(partial, *build_args, **build_kwargs)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.rename(partial, folder)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option; the description and examples as written."""


def build_parser():
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details, formatter_class=HelpFormatter)
    parser.add_argument("out_dir", help="folder that receives policy/ and classifier/")
    parser.add_argument("--data-dir", default=None, help="also write the sample datasets here")
    parser.add_argument("--rows", type=int, default=512, help="synthetic corpus rows")
    parser.add_argument("--seed", type=int, default=0, help="seed for corpus and training")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the models even if complete ones are in out_dir")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    policy, classifier = os.path.join(args.out_dir, "policy"), os.path.join(args.out_dir, "classifier")
    todo = {name: folder for name, folder, files in (("policy", policy, POLICY_FILES),
                                                     ("classifier", classifier, CLASSIFIER_FILES))
            if args.force or not is_complete(folder, files)}
    kept = [folder for name, folder in (("policy", policy), ("classifier", classifier)) if name not in todo]
    if kept:
        print(f"{' and '.join(kept)} already built: kept (--force rebuilds {'them' if len(kept) > 1 else 'it'})")
    rows = synthetic_corpus(args.rows, args.seed)
    if "policy" in todo:
        build_into(policy, build_policy, [p + c for p, c, _ in rows], seed=args.seed)
    if "classifier" in todo:
        build_into(classifier, build_classifier, classifier_texts(rows, args.seed), seed=args.seed)
    if args.data_dir:
        write_sample_data(args.data_dir, rows, args.seed)
        print(f"wrote the sample data to {args.data_dir}")
    if todo:
        print(f"wrote {' and '.join(todo.values())}")


if __name__ == "__main__":
    main()
