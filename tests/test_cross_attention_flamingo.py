"""connector=cross_attention as Flamingo has it: a text token reads only the most recent image before
it (connector.media=most_recent; all_preceding: every earlier one), a block before every `every`-th
decoder layer, and optionally the Perceiver resampler making each image's media (connector.resampler)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TOKENIZER, colour_images, open_gates, toy_model
from vlm_train.models.connectors.cross_attention import media_mask

SIZES = [(30, 100), (70, 70)]  # AnyRes: 1 + 3 and 1 + 4 tiles of the toy's 48-px tower: 39 and 51 media tokens


def cross_attention_model(*extra: str):
    return open_gates(toy_model("connector=cross_attention", *extra, tokenizer=TOKENIZER))


def allowed_images(allowed_BTI: torch.Tensor, row: int) -> list[list[int]]:
    return [allowed_TI.nonzero().flatten().tolist() for allowed_TI in allowed_BTI[row]]


def test_media_mask_most_recent_and_all_preceding_by_hand():
    """Row 0 holds images 0 and 1 (slots 1 and 3), row 1 none, row 2 image 2 (slot 0); image 3 is
    beyond the slots (a blank) and nobody sees it."""
    slots_BT = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    most_recent, all_preceding = media_mask(slots_BT, 4, most_recent=True), media_mask(slots_BT, 4, most_recent=False)
    assert allowed_images(most_recent, 0) == [[], [0], [0], [1], [1]]
    assert allowed_images(all_preceding, 0) == [[], [0], [0], [0, 1], [0, 1]]
    for allowed in (most_recent, all_preceding):
        assert allowed_images(allowed, 1) == [[]] * 5
        assert allowed_images(allowed, 2) == [[2]] * 5
    assert most_recent.shape == (3, 5, 4)


def first_block_output_and_logits(model, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states after the first gated block (what enters decoder layer 0: there each token's
    state depends on the images it reads and on nothing else) and the logits."""
    captured = []

    def capture(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    # registered after the connector's hook: sees the block's output
    handle = model.llm.decoder_layers()[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(pixels, ids).logits
    finally:
        handle.remove()
    return captured[0][0], logits[0]


def changed_positions(a_TD: torch.Tensor, b_TD: torch.Tensor) -> list[int]:
    return (a_TD - b_TD).abs().amax(dim=-1).gt(1e-6).nonzero().flatten().tolist()


@pytest.mark.parametrize("media", ["most_recent", "all_preceding"])
def test_a_token_reads_the_most_recent_image_only(media):
    """Slots at 1 and 4 of one sample. New pixels for the FIRST image change the first block's output
    from slot 1 up to the second slot, and after it only with all_preceding; new pixels for the second
    change it from slot 4 on. Logits follow causally: nothing before an image's slot sees it."""
    model = cross_attention_model(f"connector.media={media}")
    image = model.image_token_id
    ids = torch.tensor([[5, image, 6, 7, image, 8, 9]])
    generator = torch.Generator().manual_seed(0)
    first, second, other = (torch.randn(1, 3, 48, 48, generator=generator) for _ in range(3))
    hidden, logits = first_block_output_and_logits(model, torch.cat([first, second]), ids)
    new_first = first_block_output_and_logits(model, torch.cat([other, second]), ids)
    new_second = first_block_output_and_logits(model, torch.cat([first, other]), ids)
    after_second = [4, 5, 6] if media == "all_preceding" else []
    assert changed_positions(hidden, new_first[0]) == [1, 2, 3, *after_second]
    assert changed_positions(hidden, new_second[0]) == [4, 5, 6]
    assert changed_positions(logits, new_first[1]) == [1, 2, 3, 4, 5, 6]  # later tokens attend to 1..3
    assert changed_positions(logits, new_second[1]) == [4, 5, 6]


@pytest.mark.parametrize(("every", "hooked"), [(4, [0, 4]), (2, [0, 2, 4]), (1, [0, 1, 2, 3, 4])])
def test_blocks_sit_before_every_kth_layer(every, hooked):
    """A 5-layer decoder: ceil(5 / every) blocks, before layers 0, every, 2 * every, ..."""
    model = toy_model("connector=cross_attention", "llm.num_layers=5", f"connector.every={every}", tokenizer=TOKENIZER)
    assert len(model.connector.blocks) == len(hooked) == -(-5 // every)
    layers = model.llm.decoder_layers()
    assert [index for index, layer in enumerate(layers) if layer._forward_pre_hooks] == hooked


def test_the_resampler_gives_each_image_its_latents_and_receives_gradients():
    """connector.resampler=perceiver (toy: 16 latents): the blocks read [I, 16, Dl]; its parameters
    get gradients; `resampler.*` names beside `proj` and `blocks.N`."""
    model = cross_attention_model("connector.resampler=perceiver")
    image = model.image_token_id
    ids = torch.tensor([[5, image, 6, 7, image, 8, 9]])
    seen = []
    handle = model.llm.decoder_layers()[0].register_forward_pre_hook(
        lambda *_: seen.append(model.connector._state.value[0].shape)
    )
    model(torch.randn(2, 3, 48, 48), ids, labels=ids).loss.backward()
    handle.remove()
    assert seen == [torch.Size([2, 16, model.connector.llm_dim])]
    names = [name for name, _ in model.connector.named_parameters()]
    assert {name.split(".")[0] for name in names} == {"proj", "resampler", "blocks"}
    resampler = [p for name, p in model.connector.named_parameters() if name.startswith("resampler.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in resampler)


def test_a_model_with_the_resampler_learns_the_colour():
    """A few steps on images whose colour is the answer: the loss falls."""
    from vlm_train.models.vlm import IGNORE_INDEX

    model = toy_model("connector=cross_attention", "connector.resampler=perceiver", tokenizer=TOKENIZER)
    question = TOKENIZER("what color is the image ?", add_special_tokens=False).input_ids
    images = colour_images(8, seed=1)
    ids = torch.tensor([[TOKENIZER.bos_token_id, model.image_token_id, *question, 0] for _ in images])
    ids[:, -1] = torch.tensor([TOKENIZER.convert_tokens_to_ids(colour) for _, colour in images])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]
    pixels = torch.stack([image for image, _ in images])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(pixels, ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_anyres_items_of_different_lengths_are_resampled_from_their_real_tokens():
    """AnyRes images of 39 and 51 media tokens (the shorter padded in the batch): the resampler reads
    only real tokens, so each sample's logits are those it has alone."""
    model = cross_attention_model("vision.anyres=anyres", "connector.resampler=perceiver")
    image = model.image_token_id
    rows = [[5, 6, image, 7, 8], [5, image, 7, 8, 9]]
    generator = torch.Generator().manual_seed(0)
    tiles = [
        torch.randint(0, 256, (model.anyres.tiles_of(size), 3, 48, 48), generator=generator, dtype=torch.uint8)
        for size in SIZES
    ]
    together = model(torch.cat(tiles), torch.tensor(rows), image_sizes=torch.tensor(SIZES)).logits
    for row, size in enumerate(SIZES):
        alone = model(tiles[row], torch.tensor(rows[row : row + 1]), image_sizes=torch.tensor([size])).logits
        torch.testing.assert_close(together[row], alone[0], rtol=1e-5, atol=1e-5)


def test_flops_count_the_resampled_media():
    """With the resampler the blocks read 16 latents per image (not the tower's 9 patches); the meta
    model (vlm-plan's) counts the same."""
    from vlm_train import compose
    from vlm_train.plan import build_meta_model
    from vlm_train.training.flops import TrainingFlops

    extra = ["connector=cross_attention", "connector.resampler=perceiver"]
    built = TrainingFlops.of(toy_model(*extra, tokenizer=TOKENIZER))
    assert built.media_per_image == 16 and built.visual_per_image == 16
    assert built.connector_per_image > 0  # projection and resampler, per image
    assert built == TrainingFlops.of(build_meta_model(compose(["experiment=toy", *extra])))


@pytest.mark.parametrize("key", ["connector.media", "connector.resampler"])
def test_unknown_media_or_resampler_fail_in_one_line(key):
    from vlm_train import compose
    from vlm_train.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key}='foo' is not one of") as refused:
        compose(["experiment=toy", "connector=cross_attention", f"{key}=foo"])
    assert "\n" not in str(refused.value)
