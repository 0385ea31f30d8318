"""Random-weight models and tokenizers at the real sizes of the study's models, built in memory: nothing is downloaded.

Policies: gpt-neo-125M, gpt-neo-2.7B and gpt-j-6B (REFERENCE.md gives their sizes), plus tiny GPT-Neo and GPT-J
for tests and dry runs. Reward: a RoBERTa classifier of facebook/roberta-hate-speech-dynabench-r4-target's size
(labels 0 nothate, 1 hate), or a tiny one. Dropout is off: the real policies' configs have none, and the
classifier runs in eval mode.
"""

import torch

POLICIES = {
    "tiny": ("gpt_neo", dict(vocab_size=512, hidden_size=32, num_layers=4, num_heads=4,
                             attention_types=[[["global", "local"], 2]], window_size=16, intermediate_size=64,
                             max_position_embeddings=128)),
    "tiny-gptj": ("gptj", dict(vocab_size=512, n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_inner=64,
                               n_positions=128, tie_word_embeddings=False)),
    "gpt-neo-125m": ("gpt_neo", dict(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                                     attention_types=[[["global", "local"], 6]], window_size=256,
                                     intermediate_size=3072, max_position_embeddings=2048)),
    "gpt-neo-2.7b": ("gpt_neo", dict(vocab_size=50257, hidden_size=2560, num_layers=32, num_heads=20,
                                     attention_types=[[["global", "local"], 16]], window_size=256,
                                     intermediate_size=10240, max_position_embeddings=2048)),
    "gpt-j-6b": ("gptj", dict(vocab_size=50400, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_inner=16384,
                              n_positions=2048, tie_word_embeddings=False)),
}
# Parameter counts of the real checkpoints (REFERENCE.md); tests check the random models against them.
REAL_PARAMETERS = {"gpt-neo-125m": 125_198_592, "gpt-neo-2.7b": 2_651_307_520, "gpt-j-6b": 6_050_882_784}
REWARDS = {
    "tiny": dict(vocab_size=516, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=66),
    "roberta-base": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514),
}
EOS = "<|endoftext|>"


def policy_config(name):
    """The transformers config of policy size `name` (a key of POLICIES); eos is GPT-2's id 50256."""
    from transformers import GPTJConfig, GPTNeoConfig

    kind, sizes = POLICIES[name]
    eos = min(50256, sizes["vocab_size"] - 1)
    common = dict(bos_token_id=eos, eos_token_id=eos, layer_norm_epsilon=1e-5)
    if kind == "gpt_neo":
        return GPTNeoConfig(**sizes, **common, activation_function="gelu_new", embed_dropout=0.0,
                            attention_dropout=0.0, resid_dropout=0.0)
    return GPTJConfig(**sizes, **common, activation_function="gelu_new", embd_pdrop=0.0, attn_pdrop=0.0,
                      resid_pdrop=0.0)


def reward_config(name):
    """The RoBERTa classifier config of reward size `name` (a key of REWARDS), labels {0: nothate, 1: hate}."""
    from transformers import RobertaConfig

    return RobertaConfig(**REWARDS[name], type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         layer_norm_eps=1e-5, id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1},
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def policy_tokenizer(vocab_size):
    """Word-level tokenizer covering every id of the policy: 'w0'..'w50255', eos '<|endoftext|>' at 50256
    (the GPT-2 id), GPT-J's extra ids as '<|extratoken_k|>' (as its real tokenizer has). Built at once, where
    training a byte-level BPE of the real vocabulary would be slow and change nothing that is timed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = min(50256, vocab_size - 1)
    vocab = {f"w{i}": i for i in range(eos)}
    vocab[EOS] = eos
    vocab.update({f"<|extratoken_{i - eos}|>": i for i in range(eos + 1, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                        model_max_length=2048)
    tokenizer.pad_token = tokenizer.eos_token  # as detoxify_ppo.main does for gpt-neo/gpt-j
    return tokenizer


def reward_tokenizer(vocab_size, max_length):
    """RoBERTa-style word-level tokenizer: <s>=0 <pad>=1 </s>=2 <unk>=3, then the policy's words, '<s> text </s>'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(vocab_size - 4)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length)


def build_policy(config, device, dtype, attn_implementation=None):
    """Random-weight causal LM built directly on the device in its dtype (no float32 copy first, even for 6B)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)


def build_reward(name, device, dtype):
    """(tokenizer, random-weight RoBERTa classifier in eval mode) of reward size `name`, on `device` in `dtype`."""
    from transformers import RobertaForSequenceClassification

    config = reward_config(name)
    with torch.device(device):
        model = RobertaForSequenceClassification._from_config(config, dtype=dtype).eval()
    return reward_tokenizer(config.vocab_size, config.max_position_embeddings - 2), model
