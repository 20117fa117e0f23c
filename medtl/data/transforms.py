"""The one set of MONAI dictionary transforms every stage uses.

Samples are dicts with fixed keys: ``image`` (path of a preprocessed ``.npy`` array, then a
``(1, *spatial)`` tensor), ``label`` (int, -1 when unlabeled), ``hospital`` and ``patient_id``.

Each pipeline is ``preprocess`` (deterministic, cached by :class:`monai.data.CacheDataset`)
followed by random augmentation and finally intensity normalisation with the backbone's
mean/std. Normalisation comes last because the photometric augmentations (gamma, noise)
assume intensities in [0, 1].

Examples:
    >>> t = train_transform(spatial_dims=2, image_size=64, mean=(0.449,), std=(0.226,), augment=AugmentConfig())
    >>> sample = t({"image": "arrays/x.npy", "label": 1})   # sample["image"]: (1, 64, 64) float tensor
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandSpatialCropd,
    Resized,
)

from medtl.config import AugmentConfig

IMAGE = "image"
VIEWS = ("view1", "view2")


def preprocess(spatial_dims: int, image_size: int, keys: Sequence[str] = (IMAGE,)) -> list[MapTransform]:
    """Deterministic part: load the array, channel first, resize to the model's input size."""
    _check_dims(spatial_dims)
    return [
        LoadImaged(keys, reader="NumpyReader", image_only=True),
        EnsureChannelFirstd(keys, channel_dim=0),
        Resized(keys, spatial_size=(image_size,) * spatial_dims, mode="area"),
    ]


def augment(spatial_dims: int, cfg: AugmentConfig, keys: Sequence[str] = (IMAGE,)) -> list[MapTransform]:
    """Random geometric + photometric augmentation suited to grey medical images (no colour jitter)."""
    _check_dims(spatial_dims)
    rotate = cfg.rotate_deg * 3.14159265 / 180.0
    out: list[MapTransform] = []
    if cfg.flip:
        out.append(RandFlipd(keys, prob=0.5, spatial_axis=spatial_dims - 1))
    if cfg.rotate_deg > 0 or cfg.scale > 0:
        rotate_range = (rotate,) if spatial_dims == 2 else (rotate, rotate, rotate)
        out.append(RandAffined(keys, prob=0.8, rotate_range=rotate_range, scale_range=(cfg.scale,) * spatial_dims,
                               padding_mode="border", mode="bilinear"))
    out += [
        RandAdjustContrastd(keys, prob=cfg.prob, gamma=cfg.gamma),
        RandScaleIntensityd(keys, factors=cfg.intensity, prob=cfg.prob),
        RandGaussianSmoothd(keys, prob=cfg.prob / 2, sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma,
                            sigma_z=cfg.blur_sigma),
        RandGaussianNoised(keys, prob=cfg.prob, std=cfg.noise_std),
    ]
    return out


def normalize(mean: Sequence[float], std: Sequence[float], keys: Sequence[str] = (IMAGE,)) -> list[MapTransform]:
    """Backbone normalisation, then plain tensors (no MetaTensor) into the model."""
    return [
        NormalizeIntensityd(keys, subtrahend=list(mean), divisor=list(std), channel_wise=True),
        EnsureTyped(keys, data_type="tensor", track_meta=False),
    ]


def eval_transform(spatial_dims: int, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Compose:
    """Deterministic pipeline for embedding, validation and inference."""
    return Compose(preprocess(spatial_dims, image_size) + normalize(mean, std))


def train_transform(spatial_dims: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                    augment_cfg: AugmentConfig) -> Compose:
    """Supervised training pipeline: preprocess (cached) → augment → normalise."""
    return Compose(preprocess(spatial_dims, image_size) + augment(spatial_dims, augment_cfg)
                   + normalize(mean, std))


STRONG = "image_strong"


def weak_strong_transform(spatial_dims: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                          augment_cfg: AugmentConfig) -> Compose:
    """``image`` (weak view: the training augmentation) and ``image_strong`` (a strong view of the same image) for
    FixMatch-style self-training (Sohn et al., NeurIPS 2020).

    The strong view doubles the geometric ranges and applies every photometric augmentation, with its own random
    transform instances so that the two views differ.
    """
    strong = augment_cfg.model_copy(update={
        "rotate_deg": min(180.0, 2 * augment_cfg.rotate_deg), "scale": min(0.5, 2 * augment_cfg.scale),
        "intensity": 2 * augment_cfg.intensity, "noise_std": 2 * augment_cfg.noise_std, "prob": 1.0})
    return Compose(preprocess(spatial_dims, image_size) + [CopyItemsd(IMAGE, times=1, names=[STRONG])]
                   + augment(spatial_dims, augment_cfg) + augment(spatial_dims, strong, keys=(STRONG,))
                   + normalize(mean, std, keys=(IMAGE, STRONG)))


def ssl_views_transform(spatial_dims: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                        augment_cfg: AugmentConfig) -> Compose:
    """Two independently augmented views (``view1``, ``view2``) of each image for contrastive learning.

    Each view gets its own random resized crop (SimCLR, Chen et al. 2020) and its own instances of
    the random transforms: MONAI draws one set of random parameters per transform call for all its
    keys, so sharing instances would make both views identical.
    """
    min_side = max(4, int(round(image_size * augment_cfg.crop_min_scale)))
    out: list = preprocess(spatial_dims, image_size) + [CopyItemsd(IMAGE, times=2, names=list(VIEWS))]
    for view in VIEWS:
        out += [
            RandSpatialCropd(view, roi_size=(min_side,) * spatial_dims, max_roi_size=(image_size,) * spatial_dims,
                             random_size=True, random_center=True),
            Resized(view, spatial_size=(image_size,) * spatial_dims, mode="area"),
            *augment(spatial_dims, augment_cfg, keys=(view,)),
        ]
    out += [DeleteItemsd(IMAGE)] + normalize(mean, std, keys=VIEWS)
    return Compose(out)


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
