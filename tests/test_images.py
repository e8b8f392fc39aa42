import numpy as np
import pytest
import torch
from PIL import Image

from psvae_core.images import ImageInputError, to_model_images


def test_uint8_and_float_give_the_same_tensor():
    u8 = torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8)
    out = to_model_images(u8)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 20, 24)
    torch.testing.assert_close(out, u8.float() / 255)
    torch.testing.assert_close(to_model_images(u8.float() / 255), out)


def test_grey_is_expanded_and_alpha_composited_over_white():
    grey = torch.rand(1, 1, 16, 16)
    assert torch.equal(to_model_images(grey), grey.expand(1, 3, 16, 16))
    rgba = torch.rand(1, 4, 16, 16)
    expected = rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])
    torch.testing.assert_close(to_model_images(rgba), expected)
    # Fully transparent pixels become the background; a chosen background is honoured.
    rgba[:, 3] = 0
    assert torch.all(to_model_images(rgba) == 1.0)
    assert torch.all(to_model_images(rgba, background=0.0) == 0.0)


def test_numpy_and_pil_are_channels_last():
    arr = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    out = to_model_images(arr)
    assert out.shape == (1, 3, 12, 10)
    assert out[0, 2, 5, 7].item() == pytest.approx(arr[5, 7, 2] / 255)
    pil = to_model_images(Image.fromarray(arr))
    torch.testing.assert_close(pil, out)
    la = Image.fromarray(np.zeros((9, 9, 2), dtype=np.uint8), mode="LA")  # grey + transparent alpha
    assert torch.all(to_model_images(la) == 1.0)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected(bad_value):
    x = torch.rand(1, 3, 16, 16)
    x[0, 1, 3, 3] = bad_value
    with pytest.raises(ImageInputError, match="NaN/Inf"):
        to_model_images(x)


def test_out_of_range_floats_say_how_to_convert():
    with pytest.raises(ImageInputError, match="divide by 255"):
        to_model_images(torch.rand(1, 3, 16, 16) * 255)
    with pytest.raises(ImageInputError, match=r"\(x \+ 1\) / 2"):
        to_model_images(torch.rand(1, 3, 16, 16) * 2 - 1)
    # Rounding drift is clamped, not rejected.
    drift = torch.full((1, 3, 16, 16), 1.0005)
    assert to_model_images(drift).max().item() == 1.0


def test_bad_shapes_sizes_and_types():
    with pytest.raises(ImageInputError, match="channels"):
        to_model_images(torch.rand(1, 16, 16, 3))  # ComfyUI layout passed without moving channels
    with pytest.raises(ImageInputError, match="outside the supported"):
        to_model_images(torch.rand(1, 3, 4, 64))
    with pytest.raises(ImageInputError, match=r"image size 8200x16 \(width x height\)"):  # H x W tensors
        to_model_images(torch.rand(1, 3, 16, 8200))
    with pytest.raises(ImageInputError, match="dtype"):
        to_model_images(torch.zeros(1, 3, 16, 16, dtype=torch.int32))
    with pytest.raises(ImageInputError, match="unsupported image type"):
        to_model_images("image.png")
    with pytest.raises(ImageInputError, match="share"):
        to_model_images([torch.rand(3, 16, 16), torch.rand(3, 20, 16)])


@pytest.mark.parametrize("bad, fragment", [
    (torch.zeros(1, 3, 0, 0), "empty"),
    (torch.zeros(0, 3, 16, 16), "empty"),
    (torch.zeros(1, 0, 16, 16), "empty"),
    (np.zeros((0, 16, 3), dtype=np.uint8), "empty"),
    (torch.zeros(1, 3, 16, 16, device="meta"), "meta device"),
    (torch.zeros(1, 3, 16, 16).to_sparse(), "sparse"),
    (torch.zeros(3, 16, 16).to_sparse_csr(), "sparse"),
    (np.full((16, 16, 3), None, dtype=object), "numpy dtype object"),
    (np.full((16, 16, 3), "a"), "numpy dtype <U1"),
    ([], "empty"),
])
def test_empty_meta_sparse_and_object_inputs_name_the_problem(bad, fragment):
    with pytest.raises(ImageInputError, match=fragment):
        to_model_images(bad)


def test_16_bit_and_32_bit_grey_pil_images_are_scaled_by_their_mode(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]] * 8 * 2, dtype=np.uint16).reshape(8, 8)
    expected = torch.from_numpy(values.astype(np.float32) / 65535).expand(1, 3, 8, 8)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)  # a real 16-bit grey PNG, as a scanner writes it
    with Image.open(path) as png:
        assert png.mode in ("I;16", "I")
        torch.testing.assert_close(to_model_images(png), expected)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):
        assert image.mode in ("I;16", "I")
        torch.testing.assert_close(to_model_images(image), expected)
    with pytest.raises(ImageInputError, match="0..65535"):
        to_model_images(Image.fromarray(np.full((8, 8), -5, dtype=np.int32)))


def test_float_pil_images_keep_their_values_and_refuse_nan():
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    torch.testing.assert_close(to_model_images(Image.fromarray(values, mode="F")),
                               torch.from_numpy(values).expand(1, 3, 8, 8))
    values[2, 3] = np.nan
    with pytest.raises(ImageInputError, match="NaN/Inf"):
        to_model_images(Image.fromarray(values, mode="F"))


def test_mixed_list_scales_each_image_by_its_own_dtype():
    u8 = np.full((16, 16, 3), 255, dtype=np.uint8)
    floats = torch.full((3, 16, 16), 0.25)
    out = to_model_images([floats, u8])
    assert out.shape == (2, 3, 16, 16)
    assert torch.all(out[0] == 0.25) and torch.all(out[1] == 1.0)
