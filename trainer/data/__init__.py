"""The trainer's data: every stage, the evaluation and the demo read images through this package.

    report.py    DataError (the one error type), DataReport (what a source held and what was kept)
    images.py    the one image rule: suffixes, EXIF orientation, alpha over white, resize + centre crop
    sources.py   image sources of the autoencoder stages (folder, .jsonl/.csv manifest, `datasets` folder)
    captions.py  caption and edit sources of the generator stages (folders, jsonl, parquet, tar shards)
    cache.py     the keyed tensor cache (svae/rae features, generator latents), the tar caption table
    sampling.py  the resumable global sampler, evaluation shards, the `data.val_count` hold-out rule

docs/GENERATOR_DATA.md describes the formats.
"""
from psvae_core.checkpoint import fingerprint as vae_fingerprint

from .cache import (FEATURES, LATENT, CachedDataset, StringTable, StringWriter, TarCaptionTable, TensorCache,
                    encode_latents, fill_cache, fill_cache_from_tar, module_fingerprint)
from .captions import (TEXT_FIELDS, CaptionFolder, CaptionManifest, EditFolder, EditManifest, HFCaptionDataset,
                       TarShardStream, dropout_masks, expand_braces, expand_shards, iter_tar_groups, open_edit,
                       open_t2i, t2i_format)
from .images import (DESCRIPTION, IMAGE_SIZE, IMAGE_SUFFIXES, RESIZE_RULE, check_image_file, files_under, image_files,
                     is_image_name, load_image, open_rgb, read_crop, to_pil, to_uint8)
from .report import BadSample, DataError, DataReport, EmptyDatasetError, MissingDependencyError
from .sampling import GlobalBatchSampler, launcher_rank, shard_indices, split_holdout
from .sources import ImageDataset, build_image_dataset, jsonl_lines
