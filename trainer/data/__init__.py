"""The trainer's data: every stage, the evaluation and the demo read images through this package (each
module's docstring says its part; docs/TRAINER.md "Data" and docs/GENERATOR_DATA.md the formats)."""
from psvae_core.checkpoint import fingerprint as vae_fingerprint

from .cache import (FEATURES, LATENT, CachedDataset, TarCaptionTable, TensorCache, encode_latents, fill_cache,
                    fill_cache_from_tar, module_fingerprint)
from .captions import (TEXT_FIELDS, CaptionFolder, CaptionManifest, EditFolder, EditManifest, HFCaptionDataset,
                       TarShardStream, dropout_masks, expand_braces, expand_shards, open_edit, open_t2i, t2i_format)
from .images import (DESCRIPTION, IMAGE_SIZE, IMAGE_SUFFIXES, RESIZE_RULE, files_under, image_files, load_image,
                     read_crop, to_pil, to_uint8)
from .report import BadSample, DataError, DataReport, EmptyDatasetError, MissingDependencyError
from .sampling import GlobalBatchSampler, launcher_rank, shard_indices, split_holdout
from .sources import ImageDataset, build_image_dataset, jsonl_lines
