"""psvae_core.dtypes: the one table behind the config spellings and the ComfyUI widget spellings."""
from typing import get_args

import pytest
import torch

from psvae_core.dtypes import DTYPES, SHORT_NAMES, DType, to_dtype


def test_both_spellings_name_the_same_dtypes():
    assert list(get_args(DType)) == list(DTYPES) == ["float32", "bfloat16", "float16"]
    assert [to_dtype(n) for n in ("float32", "bfloat16", "float16")] == [torch.float32, torch.bfloat16, torch.float16]
    assert [to_dtype(n) for n in SHORT_NAMES] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="dtype must be one of .*'fp16'.*got 'int8'"):
        to_dtype("int8")
