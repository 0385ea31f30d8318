import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub; set before any Hugging Face import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import make_tiny_models  # noqa: E402  (scripts/ is on pytest's pythonpath, see pyproject.toml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Tests that pin torch to one thread (steadier on a shared CPU) leave the count as they found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus():
    return make_tiny_models.synthetic_corpus(512, seed=0)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, corpus):
    """Folder of a 4-block GPT-Neo pretrained on the synthetic corpus (about half its samples toxic)."""
    path = str(tmp_path_factory.mktemp("models") / "policy")
    make_tiny_models.build_policy(path, [p + c for p, c, _ in corpus])
    return path


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, corpus):
    """Folder of a 2-layer RoBERTa classifier {0: nothate, 1: hate} trained to flag the corpus' insults."""
    path = str(tmp_path_factory.mktemp("models") / "classifier")
    make_tiny_models.build_classifier(path, make_tiny_models.classifier_texts(corpus))
    return path


def run_cli(script, *args, timeout=600):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
