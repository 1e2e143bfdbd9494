"""Prefetch reads every tensor byte range once and reports progress up to the total."""

from hetero.prefetch import prefetch
from modelfile.gguf_file import GGUFModelFile


def test_prefetch_reports_all_bytes(synth):
    f = GGUFModelFile(synth("tiny", "Q4_K_M"))
    seen = []
    assert prefetch(f, lambda done, total: seen.append((done, total)))
    total = sum(t.nbytes for t in f.tensors.values())
    assert seen[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:], strict=False))
