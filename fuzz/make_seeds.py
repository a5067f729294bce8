"""Write seed corpora for the fuzz targets: small valid bundles (f32 and f16, with shared blobs)
for `bundle_reader`; the same bundles split as `[u32 data length][data][catalog]` for
`bundle_catalog`, and as `[u32 data length][data][last adapter's record]` for `bundle_record`.
Usage: python fuzz/make_seeds.py  (needs denselora importable)."""

import json

import struct
import tempfile
from pathlib import Path

import numpy as np

from denselora.bundle import pack

here = Path(__file__).parent
rng = np.random.default_rng(0)
config = {"r": 2, "groups": {"layers.0.q": "q", "layers.1.q": "q", "layers.0.up": "up"}}
tensors = {
    "shared.q.encoder": rng.standard_normal((2, 6)).astype(np.float32),
    "shared.q.decoder": rng.standard_normal((6, 2)).astype(np.float32),
    "shared.up.encoder": rng.standard_normal((2, 6)).astype(np.float32),
    "shared.up.decoder": rng.standard_normal((3, 2)).astype(np.float32),
    "layers.0.q.m": rng.standard_normal((2, 2)).astype(np.float32),
    "layers.1.q.m": rng.standard_normal((2, 2)).astype(np.float32),
    "layers.0.up.m": rng.standard_normal((2, 2)).astype(np.float32),
}
other = {k: (v * 2 if k.endswith(".m") else v) for k, v in tensors.items()}
with tempfile.TemporaryDirectory() as tmp:
    for i, (dtype, adapters) in enumerate(
        [(None, {"a": (config, tensors)}), (None, {"a": (config, tensors), "b": (config, other)}), ("f16", {"a": (config, tensors), "b": (config, other)})]
    ):
        path = Path(tmp) / f"seed{i}.dl"
        pack(path, adapters, dtype=dtype)
        data = path.read_bytes()
        offset, length = struct.unpack("<QQ", data[-32:-16])
        last = json.loads(data[offset : offset + length])["adapters"][-1]
        rec_at, rec_len = last["offset"], last["length"]
        for target, blob in [
            ("bundle_reader", data),
            ("bundle_catalog", struct.pack("<I", offset - 64) + data[64:offset] + data[offset : offset + length]),
            ("bundle_record", struct.pack("<I", rec_at - 64) + data[64:rec_at] + data[rec_at : rec_at + rec_len]),
        ]:
            out = here / "seeds" / target
            out.mkdir(parents=True, exist_ok=True)
            (out / f"seed{i}").write_bytes(blob)
print("seeds written under", here / "seeds")
