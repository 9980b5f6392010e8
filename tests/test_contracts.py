"""The model contracts: the decoder interface both backends implement, the connector base and its
one registry, and per-forward connector state that activation checkpointing replays."""

from __future__ import annotations

import pytest
import torch

from vlm_train import build_model, compose
from vlm_train.config import CONFIG_DIR, CONNECTOR_SCHEMAS
from vlm_train.data.tokenizer import build_toy_tokenizer
from vlm_train.errors import ConfigError
from vlm_train.models.connectors import CONNECTORS, Placement
from vlm_train.models.decoder import Decoder
from vlm_train.models.vlm import IGNORE_INDEX, token_cross_entropy

TOKENIZER = build_toy_tokenizer()


def toy_model(connector: str, *extra: str):
    torch.manual_seed(0)
    return build_model(compose(["experiment=toy", f"connector={connector}", *extra]), TOKENIZER)


def image_batch(model) -> tuple[torch.Tensor, ...]:
    """Three rows: two with an image (its slots after BOS), one text-only; labels on the text."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 15, (3, 24), generator=generator)
    ids[:2, 1 : 1 + model.num_image_tokens] = model.image_token_id
    labels = ids.masked_fill(ids == model.image_token_id, IGNORE_INDEX)
    pixels = torch.randn(2, 3, model.vision.image_size, model.vision.image_size, generator=generator)
    return pixels, ids, torch.ones_like(ids), labels


def trained_looking(model) -> None:
    """Move the connector off its identity-like start so a forward without its state differs."""
    with torch.no_grad():
        for name, param in model.connector.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                param.fill_(0.5)  # open cross-attention gates
            elif name.startswith("image_norms."):
                param.mul_(1.5).add_(0.1)  # image affines no longer equal the LLM's own


def gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(*batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("connector", ["ln_adapter connector.modality_norms=true", "cross_attention"])
def test_activation_checkpointing_replays_connector_state(connector):
    """Same weights, same batch: every trainable parameter's gradient is the same with the decoder's
    layers recomputed in backward (the recomputation must see the image positions / media)."""
    name, *options = connector.split()
    plain = toy_model(name, *options)
    checkpointed = toy_model(name, *options, "llm.activation_checkpointing=true")
    trained_looking(plain)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.llm.hf_model.is_gradient_checkpointing and not plain.llm.hf_model.is_gradient_checkpointing
    batch = image_batch(plain)
    expected, got = gradients(plain, batch), gradients(checkpointed, batch)
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert set(expected) == set(got) == trainable
    assert any(n.startswith(("connector.image_norms.", "connector.blocks.")) for n in trainable)
    for param_name, grad in expected.items():
        assert grad.abs().sum() > 0 or "gate" not in param_name
        torch.testing.assert_close(got[param_name], grad, rtol=1e-6, atol=1e-9, msg=param_name)


def test_megatron_decoder_refuses_activation_checkpointing():
    cfg = compose(["experiment=toy", "llm.backend=megatron", "llm.activation_checkpointing=true"])
    with pytest.raises(
        ConfigError, match="llm.activation_checkpointing=true is not supported with llm.backend=megatron"
    ):
        build_model(cfg, TOKENIZER)


def test_config_and_factory_register_the_same_connectors():
    """One name per connector: the config schema registry and the factory agree exactly, and
    every name has its YAML in the `connector` group."""
    assert set(CONNECTORS) == set(CONNECTOR_SCHEMAS)
    for name, connector_class in CONNECTORS.items():
        assert connector_class.config_class is CONNECTOR_SCHEMAS[name]
        assert CONNECTOR_SCHEMAS[name].name == name
        assert (CONFIG_DIR / "connector" / f"{name}.yaml").is_file(), name


def test_connector_placement_is_an_enum_equal_to_its_string():
    assert {name: cls.placement for name, cls in CONNECTORS.items()} == {
        "mlp": Placement.SEQUENCE,
        "qformer": Placement.SEQUENCE,
        "perceiver": Placement.SEQUENCE,
        "ln_adapter": Placement.SEQUENCE,
        "cross_attention": Placement.CROSS_ATTENTION,
        "patch_merger": Placement.SEQUENCE,
    }
    assert Placement.CROSS_ATTENTION == "cross_attention" and str(Placement.SEQUENCE) == "sequence"


def test_unknown_connector_name_is_one_line():
    from vlm_train.config import ConnectorConfig
    from vlm_train.models.connectors import build_connector

    with pytest.raises(ConfigError, match="connector=nope is unknown: choose one of"):
        build_connector(ConnectorConfig(name="nope", path=None), vision_dim=8, llm_dim=8, num_patches=4)


def test_hf_decoder_implements_the_contract():
    model = toy_model("mlp")
    llm = model.llm
    assert isinstance(llm, Decoder) and llm.sequence_first is False
    _, ids, _, labels = image_batch(model)
    logits = llm(llm.embed(ids))
    assert logits.shape == (*ids.shape, llm.vocab_size)
    assert llm.gather_logits(logits) is logits
    loss_sum, count = llm.token_cross_entropy(logits, labels)
    expected_sum, expected_count = token_cross_entropy(logits, labels)
    assert torch.equal(loss_sum, expected_sum) and int(count) == int(expected_count)
    assert len(llm.norm_modules()) == 2 * len(llm.decoder_layers()) + 1


def test_megatron_decoder_is_a_decoder():
    from vlm_train.parallel.tensor_parallel import MegatronCausalLM

    assert issubclass(MegatronCausalLM, Decoder) and MegatronCausalLM.sequence_first is True
    assert not MegatronCausalLM.__abstractmethods__


def test_a_decoder_must_say_whether_it_is_sequence_first():
    with pytest.raises(TypeError, match="sequence_first"):

        class Incomplete(Decoder):  # noqa: F841 (the class statement is what fails)
            pass
