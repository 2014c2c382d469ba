import pathlib

import pytest
import yaml

import qpass
from qpass import IntFormat, PerChannel, PerGroup, PerToken, QSpec, Recipe, RecipeError
from qpass.passes import QuantizeConfig
from qpass.recipe import schema_markdown

W4A8 = """
passes:
  - quantize:
      weights:     {bits: 4, granularity: per_group, group_size: 128, symmetric: true}
      activations: {bits: 8, granularity: per_token, dynamic: true}
      ignore: [lm_head]
"""


def test_yaml_to_typed_config():
    r = Recipe.from_str(W4A8)
    (q,) = r.passes
    assert isinstance(q, QuantizeConfig)
    assert q.weights == QSpec(IntFormat(4), PerGroup(128))
    assert q.activations == QSpec(IntFormat(8), PerToken(), dynamic=True)
    assert q.ignore == ("lm_head",)


def test_round_trip_is_exact(tmp_path):
    r = Recipe.from_str(W4A8)
    text = r.to_yaml()
    assert Recipe.from_str(text) == r
    assert Recipe.from_str(text).to_yaml() == text
    assert Recipe.from_dict(r.to_dict()) == r
    p = tmp_path / "r.yaml"
    p.write_text(text)
    assert Recipe.from_yaml(p) == r


def test_python_construction_equals_yaml():
    r = Recipe([QuantizeConfig(weights=QSpec(IntFormat(4), PerGroup(128)),
                               activations=QSpec(IntFormat(8), PerToken(), dynamic=True), ignore=("lm_head",))])
    assert r == Recipe.from_str(W4A8)


@pytest.mark.parametrize("name", sorted(p.name for p in pathlib.Path("recipes").glob("*.yaml")))
def test_presets_load_and_round_trip(name):
    r = Recipe.from_yaml(f"recipes/{name}")
    assert Recipe.from_str(r.to_yaml()) == r


def test_full_range_round_trips_and_is_omitted_when_false():
    r = Recipe.from_dict(q(weights={"bits": 4, "granularity": "per_group", "group_size": 128, "full_range": True}))
    assert r.passes[0].weights.full_range and "full_range: true" in r.to_yaml()
    assert Recipe.from_str(r.to_yaml()) == r
    assert "full_range" not in Recipe.from_dict(q(weights={"bits": 4})).to_yaml()


def test_every_format_round_trips():
    for fmt in ["int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4"]:
        d = {"passes": [{"quantize": {"weights": {"format": fmt, "granularity": "per_group", "group_size": 32}}}]}
        r = Recipe.from_dict(d)
        assert Recipe.from_str(r.to_yaml()) == r


def q(**opts):
    return {"passes": [{"quantize": opts}]}


# (recipe dict, expected error path prefix, a word the message must contain)
BAD = [
    ([], "", "mapping"),
    ({"passes": {"quantize": {}}}, "passes", "list"),
    ({"pases": []}, "pases", "did you mean 'passes'"),
    ({"version": 2, "passes": []}, "version", "version 1"),
    ({"version": "1", "passes": []}, "version", "expected int"),
    ({"verify": "yes", "passes": []}, "verify", "expected bool"),
    ({"passes": [{"quantise": {}}]}, "passes[0]", "did you mean 'quantize'"),
    ({"passes": [{"quantize": {}, "smooth": {}}]}, "passes[0]", "exactly one key"),
    ({"passes": [42]}, "passes[0]", "exactly one key"),
    ({"passes": [{"quantize": []}]}, "passes[0].quantize", "expected a mapping"),
    (q(wieghts={"bits": 4}), "passes[0].quantize.wieghts", "did you mean 'weights'"),
    (q(weights={"bitz": 4}), "passes[0].quantize.weights.bitz", "did you mean 'bits'"),
    (q(weights={"bits": 1}), "passes[0].quantize.weights.bits", "[2, 8]"),
    (q(weights={"bits": 9}), "passes[0].quantize.weights.bits", "[2, 8]"),
    (q(weights={"bits": "4"}), "passes[0].quantize.weights.bits", "expected int"),
    (q(weights={"bits": 4.0}), "passes[0].quantize.weights.bits", "expected int"),
    (q(weights={"bits": True}), "passes[0].quantize.weights.bits", "expected int"),
    (q(weights={"granularity": "per_grup", "group_size": 8}), "passes[0].quantize.weights.granularity",
     "did you mean 'per_group'"),
    (q(weights={"granularity": "per_group"}), "passes[0].quantize.weights.group_size", "required"),
    (q(weights={"granularity": "per_group", "group_size": 0}), "passes[0].quantize.weights.group_size",
     "positive"),
    (q(weights={"granularity": "per_channel", "group_size": 8}), "passes[0].quantize.weights.group_size",
     "only valid"),
    (q(weights={"format": "fp16"}), "passes[0].quantize.weights.format", "allowed"),
    (q(weights={"format": "nf4", "bits": 8}), "passes[0].quantize.weights.bits", "nf4 has 4 bits"),
    (q(weights={"format": "fp8_e4m3", "symmetric": False}), "passes[0].quantize.weights.symmetric", "symmetric"),
    (q(weights={"symmetric": "yes"}), "passes[0].quantize.weights.symmetric", "expected bool"),
    (q(weights={"dynamic": True}), "passes[0].quantize.weights.dynamic", "offline"),
    (q(weights={"granularity": "per_token", "dynamic": True}), "passes[0].quantize.weights", "dynamic"),
    (q(weights={"granularity": "per_channel", "axis": 3}), "passes[0].quantize.weights.axis", "axis"),
    (q(weights={"granularity": "per_tensor", "axis": 0}), "passes[0].quantize.weights.axis", "only valid"),
    (q(activations={"granularity": "per_token"}), "passes[0].quantize.activations.dynamic", "dynamic: true"),
    (q(activations={"granularity": "per_head"}), "passes[0].quantize.activations.granularity", "kv_cache"),
    (q(activations={"granularity": "per_channel", "axis": 0}), "passes[0].quantize.activations.axis", "-1"),
    (q(activations={"granularity": "per_group", "group_size": 8}), "passes[0].quantize.activations.granularity",
     "static"),
    (q(ignore="lm_head"), "passes[0].quantize.ignore", "expected a list"),
    (q(ignore=[1]), "passes[0].quantize.ignore[0]", "expected str"),
    (q(targets=[]), "passes[0].quantize.targets", "at least one"),
    (q(observer={"kind": "histogram"}), "passes[0].quantize.observer.kind", "allowed"),
    (q(observer={"kind": "percentile", "percentile": 120}), "passes[0].quantize.observer.percentile", "(0, 100]"),
    (q(observer={"kind": "minmax", "averaging_constant": "x"}), "passes[0].quantize.observer.averaging_constant",
     "number"),
    (q(observer={"knd": "mse"}), "passes[0].quantize.observer.knd", "did you mean 'kind'"),
    (q(weights=[4]), "passes[0].quantize.weights", "expected a mapping"),
    (q(weights={"bits": 4, "symmetric": False, "full_range": True}), "passes[0].quantize.weights.full_range",
     "symmetric"),
    (q(weights={"format": "nf4", "full_range": True}), "passes[0].quantize.weights.full_range", "integer"),
    (q(activations={"granularity": "per_token", "dynamic": True, "full_range": True}),
     "passes[0].quantize.activations.full_range", "static"),
    (q(weights={"full_range": 1}), "passes[0].quantize.weights.full_range", "expected bool"),
]


def test_bad_table_is_large_enough():
    assert len(BAD) >= 30


@pytest.mark.parametrize("data,path,word", BAD, ids=[f"{i}:{p}" for i, (_, p, _) in enumerate(BAD)])
def test_malformed_recipes_name_their_path(data, path, word):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(data)
    assert str(e.value).startswith(path), str(e.value)
    assert e.value.path.startswith(path)
    assert word in str(e.value), str(e.value)


def test_bad_yaml_text_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_str("passes: [quantize: {")
    with pytest.raises(RecipeError, match="cannot read recipe file"):
        Recipe.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(q(weights={"bits": 99})))
    with pytest.raises(RecipeError, match=r"^passes\[0\]\.quantize\.weights\.bits: .*bad\.yaml"):
        Recipe.from_yaml(bad)


def test_as_recipe_accepts_recipe_dict_and_path(tmp_path):
    r = Recipe.from_str(W4A8)
    p = tmp_path / "r.yaml"
    p.write_text(W4A8)
    assert qpass.recipe.as_recipe(r) is r
    assert qpass.recipe.as_recipe(r.to_dict()) == r
    assert qpass.recipe.as_recipe(str(p)) == r
    with pytest.raises(RecipeError, match="does not exist"):
        qpass.recipe.as_recipe(str(tmp_path / "missing.yaml"))


def test_schema_reference_is_generated_and_current():
    text = schema_markdown()
    assert "## `quantize`" in text and "| `weights` |" in text
    with open("docs/recipes.md") as f:
        assert f.read() == text, "docs/recipes.md is stale: run `make docs`"


def test_bare_pass_name_uses_defaults():
    r = Recipe.from_dict({"passes": ["quantize"]})
    assert r.passes == (QuantizeConfig(),)
    assert QuantizeConfig().weights == QSpec(IntFormat(8), PerChannel(0))


ISSUE_7_RECIPE = """
passes:
  - quantize: {weights: {bits: 4, granularity: per_channel}, activations: {bits: 8, granularity: per_token, dynamic: true}, ignore: [lm_head]}
  - kv_cache: {bits: 4, granularity: per_token}
  - qat: {data: generated, samples: 512, seq_len: 256, steps: 1000, batch_size: 8, lr: 2.0e-5, loss: kd, trainable: all, seed: 0}
"""


def test_llm_qat_recipe_shape_with_one_kv_spec_parses_to_the_long_form():
    r = Recipe.from_str(ISSUE_7_RECIPE)
    long_form = Recipe.from_yaml("recipes/llm_qat_w4a8kv4_rtn.yaml")
    assert r.passes[:2] == long_form.passes[:2]
    assert Recipe.from_str(r.to_yaml()) == r


@pytest.mark.parametrize("kv,path,word", [
    ({"bits": 4, "keys": {"bits": 8}}, "passes[0].kv_cache.keys", "not both"),
    ({"bits": 4, "granularity": "per_token", "dynamic": False}, "passes[0].kv_cache.keys.dynamic", "dynamic: true"),
    ({"bits": 9}, "passes[0].kv_cache.keys.bits", "[2, 8]"),
])
def test_kv_shorthand_errors_name_their_path(kv, path, word):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"passes": [{"kv_cache": kv}]})
    assert e.value.path.startswith(path) and word in str(e.value)
