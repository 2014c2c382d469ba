"""Tiny modules and tiny Hugging Face configs for tests."""
from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.nn import functional as F


class TinyMLP(nn.Module):
    """Two linears with a ReLU between: the smallest graph with two linear sites."""

    def __init__(self, d: int = 16, hidden: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class TinyDecoderLayer(nn.Module):
    """One pre-norm decoder block: RMSNorm -> q/k/v -> SDPA -> o_proj; RMSNorm -> SwiGLU MLP."""

    def __init__(self, d: int = 16, heads: int = 2, ffn: int = 40, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.heads = heads
        self.input_layernorm = RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def mlp_input(batch: int = 3, d: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, d, generator=torch.Generator().manual_seed(seed))


def seq_input(batch: int = 2, t: int = 5, d: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, t, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- tiny random Hugging Face causal LMs

_COMMON = dict(vocab_size=96, max_position_embeddings=64)


def hf_config(family: str):
    """A tiny config of one architecture family (random weights, seeded)."""
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **_COMMON)
    if family == "mistral":
        return transformers.MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                                          **_COMMON)
    if family == "qwen2":
        return transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **_COMMON)
    if family == "opt":
        return transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                      word_embed_proj_dim=32, **_COMMON)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96)
    if family == "llama_tied":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                        **_COMMON)
    if family == "llama_eager":   # attention as softmax(q @ k^T) @ v matmuls instead of SDPA
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                                        **_COMMON)
    if family == "phi3":      # fused qkv_proj and gate_up_proj
        return transformers.Phi3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **_COMMON)
    if family == "gpt_neox":  # fused query_key_value (per-head interleaved), parallel residual, GELU
        return transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, **_COMMON)
    if family == "mpt":       # ALiBi bias from a table of max_seq_len positions; fused Wqkv; no config max_position_embeddings
        return transformers.MptConfig(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64,
                                      vocab_size=96)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2", "llama_tied")
FUSED_FAMILIES = ("phi3", "gpt_neox")   # fused projections (not in FAMILIES: other tests parametrize over it)


def hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family))
    return model.eval()


def token_ids(batch: int = 2, t: int = 7, vocab: int = 96, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def char_tokenizer():
    """A 96-token character-level fast tokenizer (fits the tiny configs' vocab_size)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = (" \n" + string.ascii_letters + string.digits + string.punctuation)[:94]
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def save_hf_dir(path, family: str = "llama", tokenizer: bool = True, seed: int = 0) -> str:
    """Write hf_model(family) (and a char tokenizer) with save_pretrained into `path`; return the path."""
    import os

    path = os.fspath(path)
    hf_model(family, seed).save_pretrained(path)
    if tokenizer:
        char_tokenizer().save_pretrained(path)
    return path


# ---------------------------------------------------------------- trained layers (GPTQ / AWQ tests)


def correlated_input(n: int = 256, d: int = 32, outliers: int = 2, seed: int = 0) -> torch.Tensor:
    """[n, d] inputs with correlated channels and a few large-magnitude channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :outliers] *= 20.0
    return x


def trained_mlp(d: int = 32, hidden: int = 64, steps: int = 300, seed: int = 0) -> tuple[TinyMLP, torch.Tensor]:
    """A TinyMLP fitted (Adam) to a random teacher on correlated inputs; returns (model, training inputs)."""
    model, teacher = TinyMLP(d, hidden, seed=seed), TinyMLP(d, hidden, seed=seed + 1)
    x = correlated_input(512, d, seed=seed)
    with torch.no_grad():
        y = teacher(x)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model.eval(), x


_CAPTURED: dict = {}


def captured(family: str, seed: int = 0):
    """(model, qpass.capture(model)) of `hf_model(family, seed)`, captured once per test process. qpass.apply
    works on a copy of a GraphModule, so tests can share it (do not change it in place)."""
    import qpass

    if (family, seed) not in _CAPTURED:
        model = hf_model(family, seed)
        _CAPTURED[family, seed] = (model, qpass.capture(model))
    return _CAPTURED[family, seed]
