"""A1111's inpainting options as image math (`vqdm.server.a1111_inpaint`), against results worked
out by hand: the mask's box, its growth to the generation's aspect ratio, the crop and the
paste-back of "only masked", the "fill" of the masked area, and the latent fills ("latent noise",
"latent nothing") on hand-made tensors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vqdm.server.a1111_inpaint import diffuse_fill, fit_aspect, inpaint_input, mask_box, only_masked, paste_into
from vqdm.server.edit_pipeline import EditInput, latent_fill, paste_back


def _mask(size: tuple[int, int], box: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(value, box)
    return mask


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_mask_box_is_the_padded_bounding_box_within_the_picture():
    mask = _mask((100, 60), (40, 10, 50, 30))
    assert mask_box(mask, 0) == (40, 10, 50, 30)
    assert mask_box(mask, 5) == (35, 5, 55, 35)
    assert mask_box(mask, 20) == (20, 0, 70, 50)  # the top is cut at the picture's edge
    assert mask_box(_mask((100, 60), (0, 0, 0, 0)), 8) is None  # nothing to inpaint


@pytest.mark.parametrize("box, size, image, want", [
    ((192, 240, 320, 272), (512, 512), (512, 512), (192, 192, 320, 320)),  # 128x32 -> 128x128, about its middle
    ((5, 10, 15, 40), (512, 512), (100, 100), (0, 10, 30, 40)),  # 10x30 -> 30x30, shifted off the left edge
    ((80, 10, 100, 20), (64, 32), (100, 100), (80, 10, 100, 20)),  # already 2:1
    ((90, 0, 100, 40), (64, 32), (100, 100), (20, 0, 100, 40)),  # 10x40 -> 80x40, shifted off the right edge
    ((0, 0, 100, 10), (32, 32), (100, 60), (0, 0, 100, 60)),  # 100x100 does not fit: all 60 rows
])
def test_fit_aspect_grows_one_axis_and_stays_inside(box, size, image, want):
    assert fit_aspect(box, *size, image) == want


def test_only_masked_crops_resizes_and_pastes_back_into_the_source():
    source = _noise((96, 64))
    mask = _mask((96, 64), (40, 16, 48, 32))  # 8x16, padded by 4: 16x24, grown to 1:1 at 32x32 -> 24x24
    crop, crop_mask, overlay = only_masked(source, mask, 32, 32, padding=4)
    assert overlay.box == (32, 12, 56, 36) and crop.size == crop_mask.size == (32, 32)
    assert np.array_equal(np.asarray(crop), np.asarray(source.crop(overlay.box).resize((32, 32), Image.LANCZOS)))
    # the mask's 8x16 at scale 32/24 -> columns 10.7..21.3, rows 5.3..26.7 of the crop
    m = np.asarray(crop_mask)
    assert m[16, 16] == 255 and m[16, 5] == 0 and m[0, 16] == 0
    out = overlay.paste(Image.new("RGB", (32, 32), (255, 0, 255)))  # a magenta inpainting
    assert out.size == (96, 64)
    got, src, inside = np.asarray(out), np.asarray(source), np.asarray(mask) > 0
    assert np.array_equal(got[~inside], src[~inside]) and (got[inside] == (255, 0, 255)).all()


def test_paste_into_blends_through_a_soft_mask():
    source = Image.new("RGB", (4, 2), (0, 0, 0))
    mask = Image.fromarray(np.array([[0, 255, 128, 0], [0, 0, 0, 0]], dtype=np.uint8))
    out = np.asarray(paste_into(source, Image.new("RGB", (8, 8), (200, 100, 50)), (1, 0, 3, 2), mask))
    assert out[0, 1].tolist() == [200, 100, 50] and out[0, 2].tolist() == [100, 50, 25]  # PIL rounds 128/255 of it
    assert not out[1].any() and not out[0, 0].any() and not out[0, 3].any()


def test_fill_spreads_the_colours_around_the_mask_and_keeps_the_rest():
    half = np.zeros((16, 32, 3), dtype=np.uint8)
    half[:, :16] = (200, 40, 40)  # red on the left, blue on the right
    half[:, 16:] = (40, 40, 200)
    image = Image.fromarray(half)
    mask = _mask((32, 16), (8, 4, 24, 12))
    out = np.asarray(diffuse_fill(image, mask)).astype(int)
    inside = np.asarray(mask) > 0
    assert np.array_equal(out[~inside], half[~inside])
    assert (out[inside] >= 40).all() and (out[inside] <= 200).all()  # only the colours around it, blended
    assert out[8, 8, 0] > out[8, 8, 2] and out[8, 23, 2] > out[8, 23, 0]  # each side takes its neighbours' colour
    assert not np.array_equal(out[inside], half[inside])  # the source's own pixels are gone
    noise = _noise((20, 12))  # nothing masked: nothing changes
    assert np.array_equal(np.asarray(diffuse_fill(noise, Image.new("L", (20, 12), 0))), np.asarray(noise))
    grey = Image.new("RGB", (20, 12), (90, 120, 30))  # one colour around the hole: the hole takes it exactly
    holed = grey.copy()
    holed.paste((255, 255, 255), (5, 3, 15, 9))
    assert (np.asarray(diffuse_fill(holed, _mask((20, 12), (5, 3, 15, 9)))) == (90, 120, 30)).all()


def test_fill_with_a_soft_mask_blends_and_a_full_mask_keeps_the_image():
    image = Image.new("RGB", (8, 8), (100, 100, 100))
    image.putpixel((3, 5), (255, 255, 255))
    mask = _mask((8, 8), (3, 5, 4, 6), 128)  # one white pixel half masked: half its own white, half grey around
    out = np.asarray(diffuse_fill(image, mask)).astype(int)
    assert 100 < out[5, 3, 0] < 255 and (np.delete(out.reshape(64, 3), 5 * 8 + 3, 0) == 100).all()
    assert np.array_equal(np.asarray(diffuse_fill(image, _mask((8, 8), (0, 0, 8, 8)))), np.asarray(image))


def test_inpaint_input_only_masked_and_fill_paste_onto_the_unfilled_source():
    source, mask = _noise((64, 48), 1), _mask((64, 48), (20, 20, 28, 28))
    edit = inpaint_input(EditInput(image=source, mask=mask, strength=0.75), (32, 32), padding=0, fill=0)
    assert edit.image.size == edit.mask.size == (32, 32) and edit.overlay.box == (20, 20, 28, 28)
    assert edit.pixels == 32 * 32 + 64 * 48  # a queued edit counts the source it pastes into (max_queued_edit_pixels)
    out = np.asarray(paste_back(Image.new("RGB", (32, 32), (0, 255, 0)), edit))
    inside = np.asarray(mask) > 0
    assert out.shape == (48, 64, 3) and np.array_equal(out[~inside], np.asarray(source)[~inside])
    whole = inpaint_input(EditInput(image=source, mask=mask, strength=0.75), None, padding=0, fill=0)
    assert whole.image.size == (64, 48) and whole.overlay.source is source  # filled input, the source pasted onto
    assert not np.array_equal(np.asarray(whole.image)[inside], np.asarray(source)[inside])
    plain = inpaint_input(EditInput(image=source, mask=mask, strength=0.75), None, padding=0, fill=1)
    assert plain.image is source and plain.overlay is None  # fill 1, whole picture: as before
    blank = inpaint_input(EditInput(image=source, mask=Image.new("L", (64, 48), 0), strength=0.75), (32, 32), 0, 0)
    assert blank.mask is None and blank.image.size == (32, 32)  # nothing masked: A1111 runs img2img
    noise = inpaint_input(EditInput(image=source, mask=mask, strength=0.75), None, padding=0, fill=2)
    assert noise.image is source and noise.latent_fill == 2 and noise.batch_key() != plain.batch_key()


def test_latent_fill_replaces_the_masked_latents():
    import torch

    latents = torch.arange(2 * 4 * 2 * 3, dtype=torch.float32).reshape(2, 4, 2, 3)
    mask = torch.zeros(2, 1, 2, 3)
    mask[0, 0, 1, 2] = mask[1, 0, 0, 0] = 1
    noise = torch.full((2, 4, 2, 3), -7.0)
    nothing, noised = latent_fill(latents, mask, 3, noise), latent_fill(latents, mask, 2, noise)
    where = mask.expand_as(latents).bool()
    assert torch.equal(nothing[~where], latents[~where]) and torch.equal(noised[~where], latents[~where])
    assert (nothing[where] == 0).all() and (noised[where] == -7).all() and int(where.sum()) == 8
    with pytest.raises(ValueError):
        latent_fill(latents, mask, 1, noise)
