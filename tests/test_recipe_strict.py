"""Recipes that must be refused (issue 13, part 2): empty recipes, duplicate YAML keys, binary and malformed
files, out-of-range options, and the recipe path of errors raised while a pass runs."""
import pathlib

import pytest
import transformers

import qpass
from qpass import Recipe, RecipeError
from qpass.errors import CalibrationError, TargetNotFoundError
from qpass.passes import QatConfig, QuantizeConfig
from tests import toy

# ------------------------------------------------------------------------------------------ empty recipes

EMPTY = {
    "empty file": "",
    "whitespace": "\n\n   \n",
    "comment only": "# passes:\n#   - quantize: {}\n",
    "null": "null\n",
    "empty document": "---\n...\n",
}


@pytest.mark.parametrize("text", EMPTY.values(), ids=EMPTY.keys())
def test_empty_recipe_is_refused_and_names_the_file(text, tmp_path):
    with pytest.raises(RecipeError, match=r"^the recipe is empty.*'passes: \[\]'"):
        Recipe.from_str(text)
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=r"recipe is empty.*\(in .*empty\.yaml\)$"):
        Recipe.from_yaml(path)
    with pytest.raises(RecipeError, match="recipe is empty"):
        qpass.apply(toy.captured("llama")[1], str(path))


@pytest.mark.parametrize("text", ["{}", "version: 1\n", "verify: true\n"])
def test_recipe_without_passes_is_refused(text):
    with pytest.raises(RecipeError) as e:
        Recipe.from_str(text)
    assert e.value.path == "passes" and "required" in str(e.value) and "passes: []" in str(e.value)


def test_null_passes_is_refused():
    with pytest.raises(RecipeError, match=r"^passes: is empty \(null\).*passes: \[\]"):
        Recipe.from_str("version: 1\npasses:\n#  - quantize: {}\n")


def test_explicit_no_passes_is_a_baseline():
    assert Recipe.from_str("passes: []\n") == Recipe(())
    w16 = Recipe.from_yaml("recipes/w16.yaml")
    assert w16.passes == () and Recipe.from_str(w16.to_yaml()) == w16
    gm = toy.captured("llama")[1]
    assert len(qpass.apply(gm, w16).report) == 0


# ------------------------------------------------------------------------------------------ duplicate keys

DUPLICATES = [
    ("passes:\n  - quantize:\n      weights: {bits: 8, bits: 3}\n", "passes[0].quantize.weights.bits", 3, 3),
    ("passes:\n  - quantize: {weights: {bits: 4}}\npasses:\n  - quantize: {}\n", "passes", 3, 1),
    ("version: 1\npasses:\n  - smoothquant:\n      alpha: 0.5\n      targets: ['*']\n      alpha: 0.8\n",
     "passes[0].smoothquant.alpha", 6, 4),
    ("passes:\n  - quantize: {}\n  - qat:\n      steps: 10\n      lr: 1.0e-5\n      steps: 20\n",
     "passes[1].qat.steps", 6, 4),
    ("verify: false\npasses: []\nverify: true\n", "verify", 3, 1),
]


@pytest.mark.parametrize("text,path,line,first", DUPLICATES, ids=[d[1] for d in DUPLICATES])
def test_duplicate_keys_are_refused_with_their_lines(text, path, line, first, tmp_path):
    with pytest.raises(RecipeError) as e:
        Recipe.from_str(text)
    assert e.value.path == path, str(e.value)
    assert f"duplicate key (line {line}; first at line {first})" in str(e.value)
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    with pytest.raises(RecipeError, match=r"duplicate key.*\(in .*dup\.yaml\)"):
        Recipe.from_yaml(f)


def test_a_merged_key_may_be_overridden():
    text = ("passes:\n  - quantize:\n      weights: &w4 {bits: 4, granularity: per_channel}\n"
            "  - smoothquant:\n      weights: {<<: *w4, bits: 8}\n")
    first, second = Recipe.from_str(text).passes
    assert first.weights.format.bits == 4 and second.weights.format.bits == 8


def test_the_same_key_in_different_mappings_is_fine():
    r = Recipe.from_str("passes:\n  - quantize: {weights: {bits: 4}}\n  - quantize: {weights: null, "
                        "activations: {bits: 8, granularity: per_token, dynamic: true}}\n")
    assert len(r.passes) == 2


# ---------------------------------------------------------------------------------- unreadable files

def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("passes:\n  - quantize: {weights: {bits: 4}\n  - smoothquant\n")
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml(f)
    msg = str(e.value)
    assert "not valid YAML at line 3" in msg and "broken.yaml" in msg and "<unicode string>" not in msg
    with pytest.raises(RecipeError, match="not valid YAML at line 1, column"):
        Recipe.from_str("passes: [quantize: {")


def test_binary_file_is_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01binary")
    with pytest.raises(RecipeError, match=r"recipe file '.*model\.safetensors' is not UTF-8 text \(byte 0x89"):
        Recipe.from_yaml(f)
    g = tmp_path / "nul.yaml"
    g.write_bytes(b"passes: []\x00\x00\x00")
    with pytest.raises(RecipeError, match=r"'.*nul\.yaml' is a binary file \(NUL byte at offset 10\)"):
        Recipe.from_yaml(g)
    with pytest.raises(RecipeError, match="model.safetensors"):
        qpass.recipe.as_recipe(str(f))


def test_control_characters_and_bytes():
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_str("passes: [\x07]\n")
    with pytest.raises(RecipeError, match=r"from_str takes YAML text \(str\), got bytes.*from_yaml"):
        Recipe.from_str(b"passes: []\n")


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe file"):
        Recipe.from_yaml(tmp_path)


# ------------------------------------------------------------------------------------ option ranges

def q(**opts):
    return {"passes": [{"quantize": opts}]}


def one(name, **opts):
    return {"passes": [{name: opts}]}


# (recipe dict, the error path, a word the message must contain)
OUT_OF_RANGE = [
    (q(weights={"granularity": "per_group", "group_size": 10**12}), "passes[0].quantize.weights.group_size",
     "at most 65536"),
    (q(weights={"granularity": "per_group", "group_size": 65537}), "passes[0].quantize.weights.group_size",
     "per_channel"),
    (q(weights={"granularity": "per_channel", "axis": 7}), "passes[0].quantize.weights.axis", "[-4, 3]"),
    (q(activations={"granularity": "per_group", "group_size": 32, "dynamic": True, "axis": 0}),
     "passes[0].quantize.activations.axis", "-1"),
    (q(observer={"kind": "percentile", "percentile": float("nan")}), "passes[0].quantize.observer.percentile",
     "finite"),
    (one("qat", min_lr_ratio=5.0), "passes[0].qat.min_lr_ratio", "[0, 1]"),
    (one("qat", min_lr_ratio=-0.1), "passes[0].qat.min_lr_ratio", "[0, 1]"),
    (one("qat", steps=10**12), "passes[0].qat.steps", "[1, 10000000]"),
    (one("qat", samples=0), "passes[0].qat.samples", "[1, "),
    (one("qat", seq_len=1), "passes[0].qat.seq_len", "[2, "),
    (one("qat", seq_len=10**9), "passes[0].qat.seq_len", "[2, 1048576]"),
    (one("qat", warmup_steps=-1), "passes[0].qat.warmup_steps", "[0, "),
    (one("qat", steps=10, warmup_steps=11), "passes[0].qat.warmup_steps", "<= steps (10)"),
    (one("qat", weight_decay=-0.01), "passes[0].qat.weight_decay", ">= 0"),
    (one("qat", lr=0.01, weight_decay=100.0), "passes[0].qat.weight_decay", "lr * weight_decay < 1"),
    (one("qat", grad_clip=0.0), "passes[0].qat.grad_clip", "null for no clipping"),
    (one("qat", lr=float("inf")), "passes[0].qat.lr", "finite"),
    (one("qat", temperature=0.0), "passes[0].qat.temperature", "(0, 100]"),
    (one("qat", temperature=1e6), "passes[0].qat.temperature", "(0, 100]"),
    (one("qat", seed=-1), "passes[0].qat.seed", "[0, "),
    (one("qat", top_k=0), "passes[0].qat.top_k", "[1, "),
    (one("qat", batch_size=10**9), "passes[0].qat.batch_size", "[1, 65536]"),
    (one("qat", checkpoint_every=-5), "passes[0].qat.checkpoint_every", "[0, "),
    (one("qat", intermediate_weight=float("inf")), "passes[0].qat.intermediate_weight", "finite"),
    (one("smoothquant", alpha=float("nan")), "passes[0].smoothquant.alpha", "[0, 1]"),
    (one("smoothquant", search_step=1e-9), "passes[0].smoothquant.search_step", "[0.001, 1]"),
    (one("smoothquant", search_tokens=10**12), "passes[0].smoothquant.search_tokens", "[1, 1048576]"),
    (one("smoothquant", weights={"granularity": "per_channel", "axis": 2}), "passes[0].smoothquant.weights.axis",
     "[out, in]"),
    (one("smoothquant", activations={"granularity": "per_channel", "axis": 0}),
     "passes[0].smoothquant.activations.axis", "-1"),
    (one("awq", grid=10**6), "passes[0].awq.grid", "[1, 1000]"),
    (one("awq", clip_grid=0), "passes[0].awq.clip_grid", "[1, 1000]"),
    (one("awq", weights={"granularity": "per_channel", "axis": 3}), "passes[0].awq.weights.axis", "[out, in]"),
    (one("gptq", block_size=10**9), "passes[0].gptq.block_size", "[1, 65536]"),
    (one("gptq", damp=float("inf")), "passes[0].gptq.damp", "finite"),
]


@pytest.mark.parametrize("data,path,word", OUT_OF_RANGE, ids=[f"{i}:{p}" for i, (_, p, _) in enumerate(OUT_OF_RANGE)])
def test_out_of_range_options_name_their_path(data, path, word):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(data)
    assert e.value.path == path, str(e.value)
    assert str(e.value).startswith(path) and word in str(e.value), str(e.value)


def test_yaml_infinities_are_refused_with_the_file(tmp_path):
    f = tmp_path / "inf.yaml"
    f.write_text("passes:\n  - qat: {min_lr_ratio: .inf}\n")
    with pytest.raises(RecipeError, match=r"^passes\[0\]\.qat\.min_lr_ratio: expected a finite number.*inf\.yaml"):
        Recipe.from_yaml(f)


def test_every_preset_is_within_range():
    for p in sorted(pathlib.Path("recipes").glob("*.yaml")):
        Recipe.from_yaml(p)


# -------------------------------------------------------------- errors raised while the passes run

def test_run_time_errors_carry_the_pass_index():
    gm = toy.captured("llama")[1]
    recipe = Recipe([QuantizeConfig(), QuantizeConfig(weights=None, targets=("model.layer.*",))])
    with pytest.raises(TargetNotFoundError) as e:
        qpass.apply(gm, recipe, progress=False)
    assert str(e.value).startswith("passes[1].quantize.targets[0]: pattern 'model.layer.*'"), str(e.value)
    assert e.value.where == "passes[1].quantize.targets[0]"
    assert "in pass: passes[1].quantize (after ['quantize'])" in str(e.value)


def test_qat_text_file_that_does_not_exist(tmp_path):
    model = toy.hf_model("llama")
    missing = str(tmp_path / "nope.txt")
    recipe = Recipe([QuantizeConfig(), QatConfig(data=missing, steps=1, samples=1, seq_len=8, batch_size=1)])
    with pytest.raises(RecipeError) as e:
        qpass.apply(model, recipe, progress=False)
    assert e.value.path == "passes[1].qat.data"
    assert "nope.txt' does not exist" in str(e.value) and "tokenizer" not in str(e.value)
    assert "checked before any pass ran" in str(e.value)


def test_qat_text_data_needs_a_tokenizer_that_exists(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("some training text " * 50)
    recipe = Recipe([QatConfig(data=str(text), tokenizer=str(tmp_path / "no-tok"), steps=1, samples=1, seq_len=8,
                               batch_size=1)])
    with pytest.raises(RecipeError, match=r"^passes\[0\]\.qat\.tokenizer: .*no-tok' does not exist"):
        qpass.apply(toy.hf_model("llama"), recipe, progress=False)


def test_qat_seq_len_longer_than_the_model_positions():
    recipe = Recipe([QatConfig(steps=1, samples=1, seq_len=65, batch_size=1, greedy_lengths=(1,))])
    with pytest.raises(RecipeError, match=r"^passes\[0\]\.qat\.seq_len: 65 tokens .* at most 64 tokens"):
        qpass.apply(toy.hf_model("llama"), recipe, progress=False)


def test_qat_text_tokenized_outside_the_model_vocabulary(tmp_path):
    """A tokenizer that is not the model's gives ids past its embedding: refused before training."""
    small = transformers.LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=40, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(small).eval()
    toy.char_tokenizer().save_pretrained(tmp_path / "tok")          # 96 tokens
    text = tmp_path / "train.txt"
    text.write_text("Zebras quietly jumped over 42 boxes! " * 20)
    recipe = Recipe([QatConfig(data=str(text), tokenizer=str(tmp_path / "tok"), steps=1, samples=2, seq_len=16,
                               batch_size=1)])
    with pytest.raises(CalibrationError, match=r"qat data \(.*train\.txt\) has token id \d+ at \[\d+, \d+\].*"
                                               r"vocabulary has 40 tokens"):
        qpass.apply(model, recipe, progress=False)
