"""MECQuantConfig: validation messages, JSON round trip, CLI generation."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser

from mec_quant_plugin import MECQuantConfig


def test_json_round_trip_non_default_values():
    cfg = MECQuantConfig(weight_bits=3, act_bits=None, weight_granularity="per_group", group_size=16,
                         edge_layers="float", mec_view="teacher", mec_tap_modules=["a.b"], mec_order=None,
                         mec_experts=4, mec_routing="features", step="convert")
    text = cfg.to_json()
    assert '"group_size": 16' in text
    assert MECQuantConfig.from_json(text) == cfg


def test_json_round_trip_of_the_v2_terms_and_configs_saved_before_them():
    cfg = MECQuantConfig(mec_layer_weight=0.1, mec_layer_target="weights", mec_layer_experts=2,
                         mec_layer_standardize=True, mec_label_weight=0.05, distill_weight=1.0, distill_temperature=4.0)
    assert MECQuantConfig.from_json(cfg.to_json()) == cfg
    new = ("mec_layer_weight", "mec_layer_target", "mec_layer_experts", "mec_layer_standardize", "mec_label_weight",
           "distill_weight", "distill_temperature")
    old = {k: v for k, v in MECQuantConfig(weight_bits=4).to_dict().items() if k not in new}
    assert MECQuantConfig.from_dict(old) == MECQuantConfig(weight_bits=4)  # the new terms default to off
    assert (MECQuantConfig().mec_layer_weight, MECQuantConfig().mec_label_weight, MECQuantConfig().distill_weight) == (0, 0, 0)


def test_unknown_json_field_is_named():
    with pytest.raises(ValueError, match="Unknown MECQuantConfig fields \\['bogus'\\]"):
        MECQuantConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(weight_bits=0), ValueError, "weight_bits must be in 1..8, got 0"),
    (dict(weight_bits=9), ValueError, "1..8"),
    (dict(act_bits=2.0), TypeError, "act_bits must be an int in 1..8 or None"),
    (dict(weight_bits="2"), TypeError, "weight_bits"),
    (dict(weight_bits=True), TypeError, "weight_bits"),
    (dict(weight_granularity="per_row"), ValueError, "weight_granularity must be one of"),
    (dict(weight_granularity="per_group"), ValueError, "needs a positive int group_size"),
    (dict(group_size=32), ValueError, "only used with weight_granularity='per_group'"),
    (dict(ternary=True, weight_bits=3), ValueError, "ternary=True needs weight_bits=2"),
    (dict(edge_layers="4bit"), ValueError, "edge_layers must be None .* or one of \\['8bit', 'float', 'same'\\], got '4bit'"),
    (dict(step="train"), ValueError, "step must be one of"),
    (dict(mec_order=3), ValueError, "odd truncation"),
    (dict(mec_weight=-1.0), ValueError, "mec_weight must be >= 0"),
    (dict(mec_target_radius=1.5), ValueError, "converge"),
    (dict(mec_experts=0), ValueError, "mec_experts"),
    (dict(mec_view="other"), ValueError, "mec_view must be one of \\['self', 'teacher'\\]"),
    (dict(mec_tap_modules="classifier"), TypeError, "list of module names"),
    (dict(mec_layer_weight=-0.1), ValueError, "mec_layer_weight must be >= 0, got -0.1"),
    (dict(mec_layer_target="gradients"), ValueError,
     "mec_layer_target must be one of \\['activations', 'weights'\\], got 'gradients'"),
    (dict(mec_layer_experts=0), ValueError, "mec_layer_experts must be an int >= 1, got 0"),
    (dict(mec_layer_standardize="yes"), TypeError, "mec_layer_standardize must be True or False, got 'yes'"),
    (dict(mec_label_weight=float("nan")), TypeError, "mec_label_weight must be a finite number, got nan"),
    (dict(distill_weight=-1), ValueError, "distill_weight must be >= 0, got -1"),
    (dict(distill_temperature=0.0), ValueError, "distill_temperature must be > 0, got 0.0"),
    (dict(on_nonfinite="ignore"), ValueError, "on_nonfinite must be one of \\['stop', 'skip'\\], got 'ignore'"),
])
def test_bad_values_name_the_value_and_the_allowed_ones(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        MECQuantConfig(**kwargs)


def test_hf_argument_parser_builds_a_cli():
    (cfg,) = HfArgumentParser(MECQuantConfig).parse_args_into_dataclasses(
        ["--weight_bits", "3", "--act_bits", "4", "--edge_layers", "float"]
    )
    assert (cfg.weight_bits, cfg.act_bits, cfg.edge_layers) == (3, 4, "float")


def test_recommended_recipe_is_the_measured_one_and_takes_other_fields():
    from mec_quant_plugin.config import RECOMMENDED_RECIPE

    cfg = MECQuantConfig.recommended(weight_bits=2, act_bits=2)
    assert {k: getattr(cfg, k) for k in RECOMMENDED_RECIPE} == {
        "mec_weight": 0.0, "mec_mi_weight": 20.0, "distill_weight": 1.0, "distill_temperature": 4.0}
    assert (cfg.weight_bits, cfg.act_bits) == (2, 2)
    assert cfg.teacher_needs() == ["mec_mi_weight > 0", "distill_weight > 0"]
    assert MECQuantConfig.recommended(distill_temperature=2.0).distill_temperature == 2.0
    assert MECQuantConfig().teacher_needs() == []  # the field defaults stay teacher-free
    with pytest.raises(ValueError, match="mec_mi_weight must be >= 0"):
        MECQuantConfig.recommended(mec_mi_weight=-1.0)
