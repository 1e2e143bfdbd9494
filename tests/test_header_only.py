"""A DeepSeek-R1-shaped split set with a sparse data region: the header alone describes it."""

import os

from modelfile.gguf_file import GGUFModelFile
from modelfile.summary import summarize


def test_r1_shapes_and_sizes_from_the_header(r1_header):
    r1 = r1_header
    assert len(r1) == 9 and r1[0].name == "DeepSeek-R1-Q4_K_M-00001-of-00009.gguf"
    apparent = sum(os.path.getsize(p) for p in r1)
    on_disk = sum(os.stat(p).st_blocks * 512 for p in r1)
    assert apparent > 350e9 and on_disk < 100e6  # sparse: no weight byte was written
    s = summarize(GGUFModelFile(r1[0]))
    assert s["files"] == 9 and s["layers"] == 61
    assert 670e9 < s["total_params"] < 672e9  # published: 671B
    assert 36e9 < s["active_params_per_token"] < 38e9  # published: 37B
    routed = s["by_kind"]["routed experts"]["bytes"]
    assert 0.95 < routed / s["file_bytes"] < 0.99
