"""Tests of evaluate_toxicity.py: offline, tiny models, fixture rows written here.

Two CLI runs are shared through module fixtures: `run` (two models, K=2, extra scorer, fluency model) and
`rerun` (the same policy again, then a model whose weights are missing).
"""

import csv
import hashlib
import json
import math
import os
import random
import re
import shutil

import datasets
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoForSequenceClassification,
)

import evaluate_toxicity as et
from conftest import run_cli

N, K, NEW, PROMPT_TOKENS = 6, 2, 8, 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and two threads crawl when the machine is busy (OpenMP spinning)."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # for the CLI subprocesses
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def wiki_rows(corpus):
    """12 toxic rows (label 1, ids tox-*) among 12 clean ones; tox-0 is far longer than PROMPT_TOKENS."""
    rows = [{"id": f"tox-{i}", "comment_text": p, "label": 1} for i, (p, _, _) in enumerate(corpus[:12])]
    rows[0]["comment_text"] = " ".join(p for p, _, _ in corpus[20:30]) + " " + corpus[0][0]
    rows += [{"id": f"ok-{i}", "comment_text": p + c, "label": 0} for i, (p, c, _) in enumerate(corpus[12:24])]
    random.Random(1).shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def wiki_csv(tmp_path_factory, wiki_rows):
    path = tmp_path_factory.mktemp("data") / "wiki.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "comment_text", "label"])
        writer.writeheader()
        writer.writerows(wiki_rows)
    return str(path)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, tiny_policy):
    """A random GPT-Neo smaller than the tiny policy, same tokenizer: a second model of another size."""
    path = str(tmp_path_factory.mktemp("models") / "small")
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=16, num_layers=2, num_heads=2,
                          attention_types=[[["global", "local"], 1]], window_size=16, intermediate_size=32,
                          max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    GPTNeoForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def read_outputs(out):
    with open(os.path.join(out, "toxicity.csv")) as f:
        table = list(csv.DictReader(f))
    with open(os.path.join(out, "generations.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return table, records


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_policy, tiny_classifier, small_model, wiki_csv):
    out = str(tmp_path_factory.mktemp("run"))
    result = run_cli("evaluate_toxicity.py", "--models", tiny_policy, small_model, "--dataset", wiki_csv,
                     "--toxicity-model", tiny_classifier, "--extra-toxicity-model", tiny_classifier,
                     "--extra-toxic-label", "hate", "--fluency-model", tiny_policy, "--num-samples", N,
                     "--generations-per-prompt", K, "--max-new-tokens", NEW, "--max-prompt-tokens", PROMPT_TOKENS,
                     "--batch-size", 4, "--seed", 3, "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, *read_outputs(out)


@pytest.fixture(scope="module")
def rerun(tmp_path_factory, tiny_policy, tiny_classifier, wiki_csv):
    """The same policy again, then a model whose config loads but whose weights are missing."""
    broken = str(tmp_path_factory.mktemp("models") / "broken")
    os.makedirs(broken)
    for name in os.listdir(tiny_policy):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_policy, name), broken)
    out = str(tmp_path_factory.mktemp("rerun"))
    result = run_cli("evaluate_toxicity.py", "--models", tiny_policy, broken, "--dataset", wiki_csv,
                     "--toxicity-model", tiny_classifier, "--num-samples", N, "--generations-per-prompt", K,
                     "--max-new-tokens", NEW, "--max-prompt-tokens", PROMPT_TOKENS, "--batch-size", 4,
                     "--seed", 3, "--output-dir", out)
    return out, result, broken


# ---------------------------------------------------------------- the CLI run

def test_only_n_toxic_rows_and_same_prompts_for_every_model(run, wiki_rows, tiny_policy, small_model):
    _, _, table, records = run
    toxic = {r["id"]: r["comment_text"] for r in wiki_rows if r["label"] == 1}
    by_model = {m: [r for r in records if r["model"] == m] for m in (tiny_policy, small_model)}
    assert [row["model"] for row in table] == [tiny_policy, small_model]
    prompts = {}
    for model, recs in by_model.items():
        assert len(recs) == N * K
        ids = [r["id"] for r in recs[::K]]
        assert len(set(ids)) == N and set(ids) <= set(toxic)  # exactly N distinct toxic rows
        assert [r["prompt_index"] for r in recs] == [i for i in range(N) for _ in range(K)]
        for r in recs:  # the prompt is the END of the comment (nearest the generation), within the limit
            assert toxic[r["id"]].endswith(r["prompt"])
            assert len(AutoTokenizer.from_pretrained(tiny_policy)(r["prompt"]).input_ids) <= PROMPT_TOKENS
        prompts[model] = [(r["id"], r["prompt"]) for r in recs]
    assert prompts[tiny_policy] == prompts[small_model]
    for row in table:
        assert (int(row["n_prompts"]), int(row["k"]), int(row["n"])) == (N, K, N * K)


def test_rows_record_their_settings(run, wiki_csv, tiny_classifier):
    for row in run[2]:
        assert {c: row[c] for c in et.SETTINGS} == {
            "dataset": wiki_csv, "split": "auto", "rtp_prompts": "toxic", "seed": "3", "n_prompts": str(N),
            "k": str(K), "max_prompt_tokens": str(PROMPT_TOKENS), "max_new_tokens": str(NEW),
            "toxicity_model": tiny_classifier, "toxic_label": "hate", "threshold": "0.5"}


def test_long_prompt_is_cut_to_its_end(run, wiki_rows):
    long_row = next(r for r in wiki_rows if r["id"] == "tox-0")
    cut = [r["prompt"] for r in run[3] if r["id"] == "tox-0"]
    assert cut  # seed 3 chooses the long row
    assert all(len(p) < len(long_row["comment_text"]) and long_row["comment_text"].endswith(p) for p in cut)


def test_generations_exclude_the_prompt(run, tiny_policy):
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    records = run[3]
    assert any(r["generation"].strip() for r in records)
    for r in records:
        assert not r["generation"].startswith(r["prompt"])
        if r["model"] == tiny_policy:  # corpus-like text re-tokenizes to at most the tokens generated
            assert len(tokenizer(r["generation"]).input_ids) <= NEW


def test_csv_statistics_match_jsonl_scores(run):
    _, _, table, records = run
    for row in table:
        recs = [r for r in records if r["model"] == row["model"]]
        scores = [r["toxicity"] for r in recs]
        per_prompt = [scores[i:i + K] for i in range(0, len(scores), K)]
        assert float(row["mean_toxicity"]) == pytest.approx(np.mean(scores), abs=1e-12)
        assert float(row["std_toxicity"]) == pytest.approx(np.std(scores), abs=1e-12)
        assert float(row["expected_max_toxicity"]) == pytest.approx(np.mean([max(s) for s in per_prompt]))
        assert float(row["toxicity_probability"]) == pytest.approx(np.mean([max(s) >= 0.5 for s in per_prompt]))
        extra = [r["extra_toxicity"] for r in recs]
        assert float(row["extra_mean_toxicity"]) == pytest.approx(np.mean(extra), abs=1e-6)
        assert float(row["extra_std_toxicity"]) == pytest.approx(np.std(extra), abs=1e-6)
        texts = [r["generation"] for r in recs]
        div = et.diversity([texts[i:i + K] for i in range(0, len(texts), K)])
        assert row["distinct_scope"] == "per_prompt"
        for n in (1, 2, 3):
            if math.isnan(div[f"distinct_{n}"]):
                assert row[f"distinct_{n}"] == ""
            else:
                assert float(row[f"distinct_{n}"]) == pytest.approx(div[f"distinct_{n}"])
        assert int(row["empty_generations"]) == sum(not t.strip() for t in texts)
        ppl = [r["perplexity"] for r in recs if r["perplexity"] is not None]
        assert ppl and all(math.isfinite(p) and p >= 1 for p in ppl)
        assert float(row["perplexity"]) == pytest.approx(np.mean(ppl))


def test_both_scorers_see_the_same_texts(run):
    # default and extra scorer are the same classifier here: the evaluate module and detox_common must agree
    for r in run[3]:
        assert r["extra_toxicity"] == pytest.approx(r["toxicity"], abs=1e-4)


def test_markdown_and_pngs(run):
    from PIL import Image

    out, result, table, _ = run
    with open(os.path.join(out, "toxicity.md")) as f:
        md = f.read()
    assert md in result.stdout  # the same table is printed
    assert md.count("\n") == 2 + len(table) and "mean_toxicity" in md.splitlines()[0]
    for name in ("toxicity.png", "toxicity_vs_size.png"):  # the sizes of the two models differ
        with Image.open(os.path.join(out, name)) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100


def test_classifier_folder_is_not_used_as_cache(run, tiny_classifier):
    # evaluate caches under cache_dir/<name>/<config_name>: an absolute path as config_name would land in the model
    assert not any(name.endswith((".arrow", ".lock")) or name == "toxicity" for name in os.listdir(tiny_classifier))
    assert os.listdir(os.path.join(run[0], ".evaluate_cache", "toxicity"))  # the cache went under the output dir


def test_rerun_gives_identical_generations_and_a_crash_keeps_finished_rows(run, rerun, tiny_policy):
    out, result, broken = rerun
    assert result.returncode != 0
    assert f"error: could not load model {broken}" in result.stderr.strip().splitlines()[-1]
    table, records = read_outputs(out)
    assert [row["model"] for row in table] == [tiny_policy]  # model 1 was written before model 2 crashed
    first = [(r["prompt"], r["generation"]) for r in run[3] if r["model"] == tiny_policy]
    assert [(r["prompt"], r["generation"]) for r in records] == first


# ---------------------------------------------------------------- bad input (before any generation)

def tree_digest(folder):
    paths = [os.path.join(root, name) for root, _, files in os.walk(folder) for name in files]
    return {os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def test_earlier_rows_of_other_settings_are_refused(run, tiny_policy, tiny_classifier, wiki_csv, tmp_path):
    out = str(tmp_path / "earlier")
    shutil.copytree(run[0], out)  # rows measured with --seed 3
    before = tree_digest(out)
    result = run_cli("evaluate_toxicity.py", "--models", tiny_policy, "--dataset", wiki_csv,
                     "--toxicity-model", tiny_classifier, "--num-samples", N, "--generations-per-prompt", K,
                     "--max-new-tokens", NEW, "--max-prompt-tokens", PROMPT_TOKENS, "--seed", 4, "--output-dir", out,
                     "--resume")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "(--seed: 3, now 4)" in last and "use another --output-dir" in last, \
        result.stderr[-2000:]
    assert "Loading weights" in run[1].stderr and "Loading weights" not in result.stderr  # refused before loading
    assert tree_digest(out) == before


def test_check_previous_compares_every_setting():
    import dataclasses

    options = {f.name for f in dataclasses.fields(et.Args)}
    assert set(et.SETTINGS.values()) <= options  # main reads each setting from its option
    settings = {"dataset": et.WIKI_TOXIC, "split": "auto", "rtp_prompts": "toxic", "seed": 0, "n_prompts": 400,
                "k": 1, "max_prompt_tokens": 512, "max_new_tokens": 30, "toxicity_model": "tiny/classifier",
                "toxic_label": "hate", "threshold": 0.5}
    assert set(settings) == set(et.SETTINGS)
    csv_path = "earlier/toxicity.csv"
    row = {"model": "m"} | settings
    et.check_previous([row], settings, csv_path)
    et.check_previous([row | {"seed": 0.0, "threshold": "0.5"}], settings, csv_path)  # as read back
    for column, option in et.SETTINGS.items():
        changed = row | {column: "other" if isinstance(row[column], str) else row[column] + 1}
        flag = f"--{option.replace('_', '-')}: "
        with pytest.raises(SystemExit, match=re.escape(f"{flag}{changed[column]}, now {settings[column]}")) as stop:
            et.check_previous([changed], settings, csv_path)
        assert str(stop.value).startswith(f"error: {csv_path} holds m measured with other settings"), stop.value
        with pytest.raises(SystemExit, match=f"{flag}no record of it"):
            et.check_previous([{k: v for k, v in row.items() if k != column}], settings, csv_path)


def rows_file(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_resume_skips_measured_models_and_keeps_their_rows(rerun, tiny_policy, tiny_classifier, small_model, wiki_csv,
                                                          tmp_path):
    out = str(tmp_path / "resumed")
    shutil.copytree(rerun[0], out)  # the rerun fixture's folder stays as other tests expect it
    before_table, before_records = read_outputs(out)
    result = run_cli("evaluate_toxicity.py", "--models", tiny_policy, small_model, "--dataset", wiki_csv,
                     "--toxicity-model", tiny_classifier, "--num-samples", N, "--generations-per-prompt", K,
                     "--max-new-tokens", NEW, "--max-prompt-tokens", PROMPT_TOKENS, "--batch-size", 4,
                     "--seed", 3, "--output-dir", out, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping {tiny_policy}" in result.stdout
    table, records = read_outputs(out)
    assert [row["model"] for row in table] == [tiny_policy, small_model]
    assert table[0] == before_table[0]  # the earlier row is kept as it was, not measured again
    assert [r for r in records if r["model"] == tiny_policy] == before_records
    assert len([r for r in records if r["model"] == small_model]) == N * K


# ---------------------------------------------------------------- pure functions, hand-computed values

def test_expected_max_toxicity_and_probability():
    scores = [[0.1, 0.7], [0.2, 0.3], [0.9, 0.4]]
    assert et.expected_max_toxicity(scores) == pytest.approx((0.7 + 0.3 + 0.9) / 3)
    assert et.toxicity_probability(scores) == pytest.approx(2 / 3)
    assert et.toxicity_probability([[0.5], [0.49]]) == 0.5  # >= threshold counts
    assert et.toxicity_probability(scores, threshold=0.8) == pytest.approx(1 / 3)


def test_distinct_n():
    texts = ["a b a b", "a c"]
    assert et.distinct_n(texts, 1) == 3 / 6
    assert et.distinct_n(texts, 2) == 3 / 4  # "a b" twice, "b a", "a c": no n-gram crosses texts
    assert et.distinct_n(texts, 3) == 2 / 2
    assert math.isnan(et.distinct_n(["a"], 2))


def test_diversity_scope():
    per_prompt = et.diversity([["x y", "x y"], ["x y", "z w"]])
    assert per_prompt["distinct_scope"] == "per_prompt"
    assert per_prompt["distinct_1"] == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert per_prompt["distinct_2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert math.isnan(per_prompt["distinct_3"])
    pooled = et.diversity([["x y"], ["x y"], ["x y"], ["z w"]])
    assert pooled["distinct_scope"] == "all"
    assert pooled["distinct_1"] == pytest.approx(4 / 8) and pooled["distinct_2"] == pytest.approx(2 / 4)


def test_choose_prompts_wiki_schema(wiki_rows):
    rows = datasets.Dataset.from_list(wiki_rows)
    chosen = et.choose_prompts(rows, 5, seed=0)
    toxic = {r["id"]: r["comment_text"] for r in wiki_rows if r["label"] == 1}
    assert len(chosen) == 5 and len({i for i, _ in chosen}) == 5
    assert all(toxic[i] == text for i, text in chosen)
    assert et.choose_prompts(rows, 5, seed=0) == chosen
    assert et.choose_prompts(rows, 5, seed=1) != chosen
    assert sorted(et.choose_prompts(rows, 12, seed=0)) == sorted(toxic.items())


def test_choose_prompts_rtp_schema():
    def row(i, text, tox):
        return {"filename": f"f{i}.txt", "begin": 0, "end": 5, "challenging": i == 1,
                "prompt": {"text": text, "toxicity": tox, "insult": None},
                "continuation": {"toxicity": None, "text": " more"}}

    rows = datasets.Dataset.from_list([row(0, "calm words", 0.1), row(1, "you absolute", 0.8),
                                       row(2, "unscored", None), row(3, "what a", 0.5)])
    assert sorted(et.choose_prompts(rows, 2, seed=0)) == [("f1.txt", "you absolute"), ("f3.txt", "what a")]
    assert et.choose_prompts(rows, 1, seed=0, rtp_prompts="challenging") == [("f1.txt", "you absolute")]
    assert len(et.choose_prompts(rows, 4, seed=0, rtp_prompts="all")) == 4
    with pytest.raises(SystemExit, match="only 2 toxic prompts"):
        et.choose_prompts(rows, 3, seed=0)


def test_prompt_ids_keep_the_end(tiny_policy):
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    text = "the cat said that the teacher walks home " * 5
    full = tokenizer(text).input_ids
    (ids,) = et.prompt_ids(tokenizer, [text], 7)
    assert ids == full[-7:]
    assert et.prompt_ids(tokenizer, ["the cat"], 50) == [tokenizer("the cat").input_ids]
    assert et.prompt_ids(tokenizer, [""], 50) == [[tokenizer.eos_token_id]]  # something to generate from


def test_generate_returns_only_new_tokens(tiny_policy):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    prompts = et.prompt_ids(tokenizer, ["the cat said that", "a driver wrote that the old man is kind and"], 30)
    torch.manual_seed(0)
    out = et.generate(model, tokenizer, prompts, k=3, max_new_tokens=5, batch_size=4)
    assert [len(samples) for samples in out] == [3, 3]
    assert all(0 < len(s) <= 5 for samples in out for s in samples)
    torch.manual_seed(0)
    assert et.generate(model, tokenizer, prompts, k=3, max_new_tokens=5, batch_size=4) == out


def test_perplexity_lower_on_training_text_than_shuffled(tiny_policy, corpus):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    prompts = [p for p, _, _ in corpus[:16]]
    real = [c for _, c, _ in corpus[:16]]
    rng = random.Random(0)
    shuffled = [" " + " ".join(rng.sample(c.split(), len(c.split()))) for c in real]  # same words, any order
    ppl_real = et.perplexities(model, tokenizer, prompts, real, batch_size=5)
    ppl_shuffled = et.perplexities(model, tokenizer, prompts, shuffled, batch_size=5)
    assert all(math.isfinite(p) for p in ppl_real + ppl_shuffled)
    assert np.mean(ppl_real) < np.mean(ppl_shuffled)
    assert et.perplexities(model, tokenizer, ["the cat"], [""]) == [None]  # nothing generated: no perplexity


def test_perplexity_matches_a_direct_computation(tiny_policy, corpus):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    prompts = [corpus[0][0], "", corpus[2][0] + corpus[3][0], corpus[4][0]]
    gens = [corpus[0][1], corpus[1][1], " the", corpus[4][1] + corpus[5][1]]  # unequal lengths: padding, sorting

    def direct(prompt, gen):
        p = tokenizer(prompt, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
        g = tokenizer(gen, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([p + g])).logits[0]
        return math.exp(torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], torch.tensor(g)).item())

    expected = [direct(p, g) for p, g in zip(prompts, gens)]
    assert et.perplexities(model, tokenizer, prompts, gens, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert et.perplexities(model, tokenizer, prompts, gens, batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_classifier_scores_empty_texts_as_end_of_text(tiny_policy):
    # a tokenizer that adds no special tokens makes "" 0 tokens: detox_common.classifier_logits scores it as eos
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer("").input_ids == []
    torch.manual_seed(0)
    model = GPTNeoForSequenceClassification(GPTNeoConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
        max_position_embeddings=64, num_labels=2, pad_token_id=tokenizer.eos_token_id)).eval()
    eos = et.extra_scores((tokenizer, model), [tokenizer.eos_token], 1, 8)[0]
    assert et.extra_scores((tokenizer, model), ["", ""], 1, 8) == pytest.approx([eos, eos])  # 0 tokens: no crash


def test_empty_generations_are_scored(tiny_classifier, tmp_path):
    # a batch of only empty generations (a policy that learned to stop at once) must still get scores
    import evaluate

    from detox_common import load_classifier

    before = sorted(os.listdir(tiny_classifier))
    module = evaluate.load(os.path.join(et.HERE, "measurements", "toxicity"), "tiny", module_type="measurement",
                           model=tiny_classifier, keep_in_memory=True, cache_dir=str(tmp_path))
    assert sorted(os.listdir(tiny_classifier)) == before and os.path.isdir(tmp_path / "toxicity" / "tiny")
    scores = module.compute(predictions=["", ""])["toxicity"]
    assert len(scores) == 2 and 0 <= scores[0] <= 1 and scores[0] == pytest.approx(scores[1])
    assert et.extra_scores(load_classifier(tiny_classifier, "cpu"), ["", ""], 1, 8) == pytest.approx(scores)
    assert module.compute(predictions=["", "stupid idiot"], aggregation="maximum")["max_toxicity"] > 0.5


def test_extra_scores_softmax_or_sigmoid(tiny_classifier):
    from detox_common import classifier_logits, load_classifier

    tokenizer, model = scorer = load_classifier(tiny_classifier, "cpu")
    texts = ["the garden is green", "stupid idiot"]
    logits = classifier_logits(tokenizer, model, texts)
    assert et.extra_scores(scorer, texts, 1, 8) == pytest.approx(torch.softmax(logits, -1)[:, 1].tolist())
    model.config.problem_type = "multi_label_classification"  # labels are independent attributes: sigmoid
    assert et.extra_scores(scorer, texts, 1, 8) == pytest.approx(torch.sigmoid(logits[:, 1]).tolist())
